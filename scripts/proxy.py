"""A real nginx in front of a relay (or any HTTP server) on this machine, until Ctrl-C.

    make proxy                                       # or: .venv/bin/python scripts/proxy.py [flags]
    make proxy ARGS="--port 8080 --upstream http://127.0.0.1:8100 --buffering on --gzip on"
    make proxy ARGS="--upstream http://127.0.0.1:8000 --read-timeout 5"   # in front of `make serve`

Prints the nginx.conf it runs (commented: the lines that matter for streaming), then a ready line; passes on
what nginx writes to its error log (e.g. "upstream timed out"); Ctrl-C, SIGTERM or a closed terminal (SIGHUP)
stops nginx and removes its temporary folder, and it exits 0. Bad flags exit 2, a port in use or no nginx exit 1,
each with one line. The proxy itself is `streaming_tutorial.processes.proxy.Proxy`, which the lessons and
tests use.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from streaming_tutorial.processes.proxy import DEFAULT_READ_TIMEOUT_S, Proxy, ProxyError, nginx_time, parse_upstream

DEFAULT_PORT = 8080
DEFAULT_UPSTREAM = "http://127.0.0.1:8100"  # a relay's default port


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is from 1 to 65535, not {value}")
    return value


def upstream(text: str) -> str:
    try:
        return parse_upstream(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def seconds(text: str) -> float:
    try:
        value = float(text)
        nginx_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of seconds above 0, not {text!r}") from None
    return value


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")
    return text == "on"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="scripts/proxy.py",
        description="A real nginx on 127.0.0.1:PORT in front of UPSTREAM, set up for streaming (buffering off) "
                    "unless told otherwise; Ctrl-C stops it.")
    parser.add_argument("--port", type=port, default=DEFAULT_PORT, help=f"where nginx listens (default {DEFAULT_PORT})")
    parser.add_argument("--upstream", type=upstream, default=DEFAULT_UPSTREAM,
                        help=f"http://HOST:PORT it relays to (default {DEFAULT_UPSTREAM}, a relay's default port)")
    parser.add_argument("--buffering", type=on_off, default=False, metavar="on|off",
                        help="nginx's proxy_buffering (default off; on is nginx's own default)")
    parser.add_argument("--gzip", type=on_off, default=False, metavar="on|off",
                        help="gzip text/event-stream too (default off; with --buffering on it holds streams back)")
    parser.add_argument("--read-timeout", type=seconds, default=DEFAULT_READ_TIMEOUT_S, metavar="S",
                        help=f"nginx's proxy_read_timeout in seconds (default {DEFAULT_READ_TIMEOUT_S:g}; nginx's "
                             f"own is 60)")
    return parser.parse_args(argv)


def new_lines(path: Path | None, offset: int) -> tuple[list[str], int]:
    """The lines written to `path` after byte `offset`, and the new offset."""
    try:
        with path.open("rb") as log:
            log.seek(offset)
            data = log.read()
    except (OSError, AttributeError):
        return [], offset
    complete = data[:data.rfind(b"\n") + 1]
    return complete.decode(errors="replace").splitlines(), offset + len(complete)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    proxy = Proxy(args.upstream, args.port, buffering=args.buffering, gzip=args.gzip,
                  read_timeout_s=args.read_timeout)
    settings = ", ".join([f"buffering {'on' if args.buffering else 'off'}", *(["gzip on"] if args.gzip else []),
                          f"read timeout {args.read_timeout:g} s"])
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in stopping}
    for sig in stopping:  # `kill` or a closed terminal: stop nginx, as Ctrl-C does
        signal.signal(sig, signal.default_int_handler)
    folder = pid = None
    code = 0
    try:
        proxy.start()
        folder, pid = proxy.prefix, proxy.process.pid
        print(f"nginx config ({folder}/nginx.conf):\n{proxy.config}", flush=True)
        print(f"Proxy ready: {proxy.url} -> {proxy.upstream} ({settings}); Ctrl-C stops it.", flush=True)
        offset = 0
        while proxy.running():
            lines, offset = new_lines(proxy.error_log, offset)
            for line in lines:
                print(f"nginx: {line}", flush=True)
            time.sleep(0.5)
        lines, offset = new_lines(proxy.error_log, offset)
        print("\n".join([f"nginx exited by itself with code {proxy.process.returncode}; its last words:", *lines]),
              file=sys.stderr, flush=True)
        code = 1
    except ProxyError as error:
        print(f"scripts/proxy.py: {error}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        pass
    finally:
        for sig in stopping:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        proxy.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        print(f"Stopped nginx (pid {pid}) on {proxy.url} and removed {folder}." if pid else
              "Stopped before nginx was ready; nothing is left running.", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
