"""A real nginx in front of an HTTP upstream (a relay, a vLLM server), for the lessons on proxies and their tests.

    python -m streaming_tutorial.processes.proxy   # `make nginx`: find nginx, or install Debian's; print which
    make proxy ARGS="--port 8080 --upstream http://127.0.0.1:8100 --buffering on"   # one in the foreground

    with Proxy("http://127.0.0.1:8100") as proxy:      # set up for streaming: proxy_buffering off
        print(proxy.config)                              # the nginx.conf it runs, commented for learners
        with httpx.stream("POST", proxy.url_for("v1", "chat", "completions"), json=body) as response:
            ...
    Proxy(upstream, buffering=True, gzip=True)          # the trap: the stream arrives only when it ends

What nginx 1.22 (Debian 12) was seen to do with a stream of small SSE events (tests/test_proxy.py holds it to
this): with `proxy_buffering off` each event arrives on its own as it is sent; with `proxy_buffering on` alone,
the same while the client keeps up (nginx passes on at once what it has read); with `proxy_buffering on` and
gzip on text/event-stream, nothing arrives, not even the headers, until the stream ends. The upstream's
`X-Accel-Buffering: no` header turns buffering off for its own response, and streaming comes back.

nginx runs in the foreground as the current user, with its config, pid, error log and temp files in a
temporary folder of its own (`nginx -p FOLDER -c FOLDER/nginx.conf`), in a process group of its own; `stop()`
stops the group and removes the folder, so nothing outlives the `with` block. It never touches a system nginx:
Debian's package may start one on port 80 after `apt-get install nginx` on a machine with systemd (in a
container it usually does not); this module neither relies on it nor stops it.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from streaming_tutorial.processes.local_server import Endpoint, free_port, tail
from streaming_tutorial.processes.stopping import stop_process_group
from streaming_tutorial.processes.system_tool import apt_install

HOW_TO_GET_ONE = ("No nginx found: install your system's nginx package (e.g. `sudo apt-get install nginx`), "
                  "then `make nginx` again.")
# Debian puts nginx in /usr/sbin, which is not on a normal user's PATH.
SYSTEM_NGINX = Path("/usr/sbin/nginx")
DEFAULT_READ_TIMEOUT_S = 300.0
# nginx starts in tens of milliseconds; a busy 2-core machine gets a generous margin.
DEFAULT_STARTUP_TIMEOUT = 15.0


class ProxyError(RuntimeError):
    """nginx could not start: none found, the port is taken, or it exited (the message says which)."""


def find_nginx() -> str | None:
    """The nginx on PATH, else Debian's /usr/sbin/nginx, else None."""
    found = shutil.which("nginx")
    if found:
        return found
    return str(SYSTEM_NGINX) if SYSTEM_NGINX.exists() else None


def nginx_version(nginx: str) -> str:
    """E.g. "nginx/1.22.1" (`nginx -v` writes it to stderr)."""
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def parse_upstream(url: str) -> str:
    """`http://HOST:PORT` (a trailing / allowed) as nginx's `proxy_pass` takes it; ValueError, one line, if not.
    A path is refused: nginx would put it in place of the request's `/`, which is rarely what is meant."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"the upstream {url!r} is not a URL: {error}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the upstream must be an http:// URL such as http://127.0.0.1:8100, not {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"the upstream must be http://HOST:PORT, without a path, query or user, not {url!r}")
    if any(c.isspace() or c in ';{}"\'$\\' for c in parts.netloc):
        raise ValueError(f"the upstream {url!r} has characters that do not belong in a host name")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{host}:{80 if port is None else port}"


def nginx_time(seconds: float) -> str:
    """nginx takes whole units: 300 -> "300s", 1.5 -> "1500ms"."""
    if not 0 < seconds < math.inf:
        raise ValueError(f"a timeout must be more than 0 s, not {seconds}")
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


def config_text(listen_port: int, upstream: str, *, buffering: bool, read_timeout_s: float, prefix: Path,
                gzip: bool = False) -> str:
    """A complete nginx.conf: nginx in the foreground on 127.0.0.1:`listen_port`, everything it writes under
    `prefix`, one `location /` relaying to `upstream` (http://HOST:PORT). buffering=False is right for token
    streams; buffering=True is nginx's default, and with gzip=True (compressing text/event-stream too) shows
    the trap: the client gets the stream only when it ends."""
    prefix = Path(prefix)
    upstream = parse_upstream(upstream)
    user = ("# Started as root, nginx runs its workers as `nobody`, which cannot enter this private (0700) folder:\n"
            "# a request body too big for memory (over 8 KB on x86-64: a long prompt) would fail with 500. So:\n"
            "user root;\n") if os.geteuid() == 0 else ""
    buffering_comment = "\n            ".join([
        "# ON (nginx's default): nginx reads the upstream into its buffers as fast as it can, whatever the",
        "# client's pace. nginx 1.22 still passes each chunk on as it comes while the client keeps up, but gzip",
        "# on the stream then holds it all back, headers included, until it ends. An upstream's",
        "# `X-Accel-Buffering: no` header turns buffering off for its own response.",
    ] if buffering else [
        "# OFF: each chunk goes on to the client as it arrives, flushed through every filter (gzip too):",
        "# what a token stream needs. nginx's default is on.",
    ])
    gzip_lines = "\n    ".join([
        "# Compress the stream too (for clients that accept gzip: browsers, httpx, openai), as a config with",
        "# `gzip_types *` does: harmless with proxy_buffering off, but with it on nginx sends nothing, not even",
        "# the headers, until the stream ends.",
        "gzip on;",
        "gzip_types text/event-stream;",
    ] if gzip else [
        "# nginx's default. A gzipped text/event-stream with proxy_buffering on arrives only when it ends.",
        "gzip off;",
    ])
    return f"""\
# nginx in front of {upstream}, for streaming (written by streaming_tutorial/processes/proxy.py).
# Runs in the foreground: nginx -e {prefix}/error.log -p {prefix} -c {prefix}/nginx.conf
{user}daemon off;                      # stay in the foreground, a child of whoever started it
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;   # "upstream timed out" lands here

events {{
    # Each stream holds two connections (client and upstream): about 250 streams at once.
    worker_connections 512;
}}

http {{
    access_log off;
    # Where nginx spills request and response bodies too big for memory: inside our own folder.
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    # A long prompt's JSON can pass nginx's default limit of 1 MB for a request body (413 Request Entity Too Large).
    client_max_body_size 16m;
    {gzip_lines}

    server {{
        listen 127.0.0.1:{listen_port};

        location / {{
            proxy_pass {upstream};
            # HTTP/1.1 to the upstream: it can send the stream in chunks (HTTP/1.0 has no chunked encoding,
            # so the upstream has to close the connection to end a response) and keep connections open.
            proxy_http_version 1.1;
            # nginx sends the upstream `Connection: close` by default; "" sends no such header, so that the
            # HTTP/1.1 connection can be kept open (streams work either way; it saves a connect per request).
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            {buffering_comment}
            proxy_buffering {"on" if buffering else "off"};
            # How long nginx waits between two reads from the upstream before it closes the stream (default
            # 60 s): a long prefill or a queue that sends nothing is cut, unless the upstream sends keep-alive
            # comments (vLLM: --sse-keep-alive-interval).
            proxy_read_timeout {nginx_time(read_timeout_s)};
        }}
    }}
}}
"""


def port_in_use(host: str, port: int) -> bool:
    """Whether nginx's bind would fail: nginx sets SO_REUSEADDR, so a port in TIME_WAIT counts as free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Proxy(Endpoint):
    """nginx on 127.0.0.1:`port` (0: a free one) relaying to `upstream`, an http://HOST:PORT URL or an `Endpoint`
    (a `LocalServer`, whose API key `headers` then carries), with `config_text`'s settings. `config` is the
    nginx.conf text once started; `error_log` its error log's path while it runs."""

    def __init__(self, upstream: str | Endpoint, port: int = 0, *, buffering: bool = False,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, gzip: bool = False, api_key: str | None = None,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT):
        if isinstance(upstream, Endpoint):
            api_key = api_key or upstream.api_key
            upstream = upstream.url
        self.upstream = parse_upstream(upstream)
        nginx_time(read_timeout_s)  # refuse a bad timeout now rather than when nginx starts
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.api_key = api_key
        self.buffering = buffering
        self.gzip = gzip
        self.read_timeout_s = read_timeout_s
        self.startup_timeout = startup_timeout
        self.prefix: Path | None = None  # the temporary folder, while started
        self.config: str | None = None
        self.process: subprocess.Popen | None = None
        self.stopped = False

    @property
    def error_log(self) -> Path | None:
        return self.prefix / "error.log" if self.prefix else None

    def start(self) -> Proxy:
        """Write the config to a fresh temporary folder, start nginx, and return once it accepts connections.
        Raises ProxyError (and leaves nothing behind) if there is no nginx, the port is taken, or nginx exits."""
        nginx = find_nginx()
        if nginx is None:
            raise ProxyError(HOW_TO_GET_ONE)
        if self.process is not None and not self.stopped:
            raise ProxyError(f"this proxy is already started on port {self.port}; stop() it first")
        self.stopped = False
        if port_in_use(self.host, self.port):
            raise ProxyError(f"port {self.port} is already in use on {self.host}")
        try:
            self.prefix = Path(tempfile.mkdtemp(prefix="nginx-proxy-"))
            self.config = config_text(self.port, self.upstream, buffering=self.buffering,
                                      read_timeout_s=self.read_timeout_s, prefix=self.prefix, gzip=self.gzip)
            conf = self.prefix / "nginx.conf"
            conf.write_text(self.config)
            # `-e`: the messages nginx writes before it has read the config go to our log too, not to
            # /var/log/nginx/error.log. A session of its own: a closed terminal's SIGHUP (which tells nginx to
            # reload) and Ctrl-C's SIGINT reach only whoever started it, which then stops it.
            with self.error_log.open("ab") as log:
                self.process = subprocess.Popen([nginx, "-e", str(self.error_log), "-p", str(self.prefix),
                                                 "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
            self.wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_listening(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not accepts_connections(self.host, self.port):
            if self.process.poll() is not None:
                raise ProxyError(self.failure(f"nginx exited with code {self.process.returncode} before it "
                                              f"accepted connections on port {self.port}"))
            if time.monotonic() > deadline:
                raise ProxyError(self.failure(f"nginx did not accept connections on port {self.port} in "
                                              f"{self.startup_timeout:.0f} s"))
            time.sleep(0.05)

    def failure(self, what: str) -> str:
        log = tail(self.error_log, 10)
        if "Address already in use" in log:  # taken between our check and nginx's bind
            return f"port {self.port} is already in use on {self.host}"
        return f"{what}; last lines of its error log:\n{log}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop nginx's process group (SIGTERM: nginx's fast shutdown, then SIGKILL after `timeout`), and remove
        the temporary folder, even if interrupted. Returns nginx's exit code (None if it never started)."""
        try:
            if self.process is None:
                return None
            if not self.stopped:  # a second stop must not signal a group whose number may have been reused
                codes = stop_process_group(self.process.pid, timeout)
                # psutil reaped our child, so Popen can no longer learn its exit code by itself.
                if self.process.returncode is None and codes.get(self.process.pid) is not None:
                    self.process.returncode = codes[self.process.pid]
                self.process.wait(timeout=10)
                self.stopped = True
            return self.process.returncode
        finally:
            if self.prefix is not None:
                shutil.rmtree(self.prefix, ignore_errors=True)
                self.prefix = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main() -> int:
    found = find_nginx()
    if not found and apt_install("nginx", "nginx"):
        found = find_nginx()
    if not found:
        print(HOW_TO_GET_ONE)
        return 1
    print(f"nginx for the proxy lessons and tests: {found} ({nginx_version(found)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
