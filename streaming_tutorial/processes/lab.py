"""JupyterLab on the notebooks, started one way for `make lab` and for the test that opens a notebook in it.

    python -m streaming_tutorial.processes.lab [JUPYTERLAB FLAGS]   # `make lab` (ARGS="--ip 0.0.0.0" passes flags)

    with Lab(root_dir=folder, env={"TUTORIAL_SERVER_URL": url}) as lab:   # the tests
        page.goto(lab.url_for("lab", "tree", "02-stream-with-curl.ipynb"))

JupyterLab runs from this project's venv, so its `python3` kernel is the venv's ipykernel (the venv's
kernelspec comes before a user's own `python3` in jupyter_core's search order) and `import streaming_tutorial`
works. It listens on a loopback port (8888, JupyterLab's own, when free; else any free one) with a random token,
gets `--allow-root` only when run as root (JupyterLab refuses root without it), and `--no-browser` when this
machine has no graphical session to open a browser in (it would pick a text browser, or fail). Its output goes to
a log file. `start()` polls `/api/status` with the token until it answers, failing at once with the log's last
lines if JupyterLab exits first. `stop()` (also on Ctrl-C) stops JupyterLab, then whatever it started: kernels run
in sessions of their own, so they and their process groups are stopped too.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

from streaming_tutorial.model import PROJECT_ROOT
from streaming_tutorial.processes.local_server import LOG_DIR, free_port, poll_until_ok, tail
from streaming_tutorial.processes.stopping import group_members, stop_processes

NOTEBOOKS = PROJECT_ROOT / "notebooks"
JUPYTERLAB_PORT = 8888  # JupyterLab's own default: the address a learner expects
STARTUP_TIMEOUT = 120.0  # about 5 s on an idle 2-core machine; much more beside a busy vLLM server


class LabStartError(RuntimeError):
    """JupyterLab exited or did not answer in time; the message carries its last log lines."""


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def can_open_browser() -> bool:
    """Whether JupyterLab may open a browser here: a graphical session (or macOS), or a BROWSER the user chose.
    Without one, Python's `webbrowser` (which JupyterLab uses) falls back to a text browser in the terminal."""
    return bool(os.environ.get("BROWSER") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or sys.platform == "darwin")


class Lab:
    """JupyterLab serving `root_dir` on `ip`:`port` (a free loopback port unless given), with a random token."""

    def __init__(self, root_dir: Path = NOTEBOOKS, *, port: int | None = None, ip: str = "127.0.0.1",
                 open_browser: bool = False, args: list[str] | tuple[str, ...] = (),
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT) -> None:
        self.root_dir = Path(root_dir)
        self.ip = ip
        self.port = port or free_port()
        self.token = secrets.token_hex(24)
        self.open_browser = open_browser
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="jupyterlab-",
                                                                              suffix=".log")[1])
        self.argv = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={self.root_dir}",
                     f"--ServerApp.ip={ip}", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                     *([] if open_browser else ["--no-browser"]),
                     *(["--allow-root"] if os.geteuid() == 0 else []), *args]
        # The token goes in the environment, not on the command line, where `ps` would show it to every user.
        self.env = {**os.environ, **(env or {}), "JUPYTER_TOKEN": self.token}
        self.process: subprocess.Popen | None = None
        self.stopped = False

    @property
    def local_url(self) -> str:
        """The address to reach it on from this machine (also when it listens on every interface)."""
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, *parts: str, token: bool = True) -> str:
        """`local_url` + parts, with `?token=...`, which logs a browser in."""
        url = "/".join([self.local_url, *parts])
        return f"{url}?token={self.token}" if token else url

    def start(self) -> Lab:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=self.root_dir, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self) -> dict:
        """Poll /api/status with the token until it answers 200; return its JSON."""
        return poll_until_ok(self.url_for("api", "status", token=False), self.startup_timeout, what="JupyterLab",
                             process=self.process, log_path=self.log_path, interval=0.5, error=LabStartError,
                             headers={"Authorization": f"token {self.token}"}).json()

    def kernels(self) -> list[psutil.Process]:
        """The kernel processes JupyterLab runs now (its children; each leads a session of its own)."""
        try:
            return psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace: float = 15.0) -> int | None:
        """Stop JupyterLab (SIGTERM: it shuts its kernels down), then SIGKILL whatever is left of it, of the
        processes it started and of their process groups (a kernel's, a server's a notebook started).
        Returns JupyterLab's exit code."""
        if self.process is None or self.stopped:
            return None if self.process is None else self.process.returncode
        if threading.current_thread() is threading.main_thread():  # a second Ctrl-C must not cut the stop short
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                return self._stop(grace)
            finally:
                signal.signal(signal.SIGINT, previous)
        return self._stop(grace)

    def _stop(self, grace: float) -> int | None:
        try:
            started = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            started = []
        own_group = os.getpgid(0)
        groups = {self.process.pid} | {_pgid(p) for p in started}
        groups -= {None, own_group}
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        rest = {p.pid: p for p in started if _alive(p)}
        for group in groups:
            rest.update((p.pid, p) for p in group_members(group))
        rest.pop(os.getpid(), None)
        stop_processes(list(rest.values()), grace=5)
        if self.process.poll() is None:
            self.process.kill()
        self.stopped = True
        return self.process.wait(timeout=10)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def how_to_reach(lab: Lab, opened: bool) -> list[str]:
    """The lines `make lab` prints once JupyterLab answers."""
    url = lab.url_for("lab")
    lines = [f"JupyterLab: {url}", f"  notebooks: {lab.root_dir}", f"  log: {lab.log_path}"]
    if lab.ip in ("127.0.0.1", "localhost", "::1"):
        if opened:
            lines.append("  opening it in this machine's browser")
        else:
            user, host = getpass.getuser(), socket.gethostname()
            lines += ["  no graphical browser on this machine: from another machine's terminal, tunnel to it",
                      f"    ssh -N -L {lab.port}:127.0.0.1:{lab.port} {user}@{host}   (the address you ssh to)",
                      f"  and open {url} in that machine's browser",
                      '  (or listen on every interface: make lab ARGS="--ip 0.0.0.0"; then anyone who can reach',
                      "  this machine and has the token can run code on it)"]
    else:
        host = socket.gethostname() if lab.ip in ("0.0.0.0", "::", "") else lab.ip
        lines += [f"  from another machine: http://{host}:{lab.port}/lab?token={lab.token}",
                  f"  listening on {lab.ip}: anyone who can reach this port and has the token can run code here"]
    lines.append("Stop it with Ctrl-C (it stops the kernels too).")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="JupyterLab on the notebooks (`make lab`); other flags go to "
                                                 "JupyterLab, e.g. --ip 0.0.0.0")
    parser.add_argument("--ip", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=0, help=f"default: {JUPYTERLAB_PORT} if free, else any free")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument("--log", type=Path, default=LOG_DIR / "lab.log", 
                        help="where JupyterLab's output goes (default: %(default)s)")
    args, rest = parser.parse_known_args(argv)
    port = args.port or (JUPYTERLAB_PORT if port_is_free(JUPYTERLAB_PORT) else free_port())
    opened = can_open_browser() and not args.no_browser
    lab = Lab(NOTEBOOKS, ip=args.ip, port=port, open_browser=opened, args=rest, log_path=args.log)
    print(f"starting JupyterLab on the notebooks (log: {lab.log_path})", flush=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal or `kill`: stop everything, as Ctrl-C does
        signal.signal(sig, signal.default_int_handler)
    try:
        with lab:
            print("\n".join(how_to_reach(lab, opened)), flush=True)
            code = lab.process.wait()
            if code:
                print(f"JupyterLab exited with code {code}; last log lines ({lab.log_path}):\n{tail(lab.log_path)}")
            else:
                print("JupyterLab shut down")
            return code
    except LabStartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped JupyterLab and its kernels")
        return 0


if __name__ == "__main__":
    sys.exit(main())
