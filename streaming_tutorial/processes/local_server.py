"""Start `streaming_server.py` as a child process, wait until it is healthy, and stop it completely.

Used by the tests, the notebooks and the benchmark, in the style of vLLM's own `RemoteOpenAIServer`:

    with LocalServer(["--max-num-seqs", "16"]) as server:
        client = openai.OpenAI(base_url=server.url_for("v1"), api_key=server.api_key)
        ...

The server runs in its own process group with its output in a log file; `stop()` stops the whole group
(vLLM's engine and worker processes included, `stopping.stop_process_group`), so nothing outlives the
`with` block.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from streaming_tutorial.model import PROJECT_ROOT
from streaming_tutorial.processes.stopping import stop_process_group

SERVER_SCRIPT = PROJECT_ROOT / "streaming_server.py"
LOG_DIR = PROJECT_ROOT / "logs"  # gitignored; servers started by tests and notebooks log here
# A cold start compiles the model, which takes minutes on a small busy CPU (docs/benchmarks.md).
DEFAULT_STARTUP_TIMEOUT = 600.0
# Tests and notebooks share the machine with other servers: keep each one's KV cache small and explicit.
TEST_KV_CACHE_BYTES = str(512 << 20)


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message carries its last log lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def poll_until_ok(url: str, timeout: float, *, what: str = "the server", process: subprocess.Popen | None = None,
                  log_path: Path | None = None, headers: dict[str, str] | None = None, interval: float = 1.0,
                  error: type[Exception] = ServerStartError) -> httpx.Response:
    """GET `url` every `interval` s until it answers 200, and return that answer. Raises `error`, with the log's
    last lines, when `process` (`what`, if we started it) exits first or `timeout` s pass. The one poll loop
    behind a server's, the router's and JupyterLab's start."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise error(f"{what} exited with code {process.returncode} before it answered; "
                        f"last log lines ({log_path}):\n{tail(log_path)}")
        try:
            response = httpx.get(url, timeout=5, headers=headers)
            if response.status_code == 200:
                return response
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as failure:
            last = type(failure).__name__
        time.sleep(interval)
    detail = f"; last log lines ({log_path}):\n{tail(log_path)}" if log_path else ""
    raise error(f"{what} at {url} did not answer 200 in {timeout:.0f} s ({last}){detail}")


def wait_until_healthy(url: str, timeout: float, process: subprocess.Popen | None = None,
                       log_path: Path | None = None) -> dict | None:
    """Poll `url`/health until it answers 200 and return its JSON (None for plain vLLM's empty body). Fails
    fast, with the log's last lines, if `process` (the server, when we started it) exits first."""
    response = poll_until_ok(url.rstrip("/") + "/health", timeout, process=process, log_path=log_path)
    return response.json() if response.content.strip() else None


class Endpoint:
    """The address of a server this package starts on `host`:`port`, and the headers its API key needs."""

    host: str
    port: int
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class LocalServer(Endpoint):
    """`streaming_server.py` (or plain vLLM, with `command=`) on a free loopback port."""

    def __init__(self, args: list[str] | tuple[str, ...] = (), *, api_key: str | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
                 log_path: Path | None = None, command: list[str] | None = None):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.api_key = api_key
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-",
                                                                              suffix=".log")[1])
        base = command or [sys.executable, str(SERVER_SCRIPT)]
        self.argv = [*base, "--host", self.host, "--port", str(self.port), *args]
        if api_key:
            self.argv += ["--api-key", api_key]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.health: dict | None = None  # /health's JSON once started

    def start(self) -> LocalServer:
        self.launch()
        try:
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> subprocess.Popen:
        """Start the server process, in a session (process group) of its own, without waiting for it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=PROJECT_ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        return self.process

    def wait_until_healthy(self) -> dict | None:
        """Poll /health until it answers 200; return its JSON (None for plain vLLM's empty body)."""
        self.health = wait_until_healthy(self.url, self.startup_timeout, self.process, self.log_path)
        return self.health

    def process_tree(self) -> list[psutil.Process]:
        """The server process and every process it started (engine, workers, resource tracker)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL after `timeout`). Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            codes = stop_process_group(self.process.pid, timeout)
            # psutil reaped our child, so Popen can no longer learn its exit code by itself.
            if codes.get(self.process.pid) is not None:
                self.process.returncode = codes[self.process.pid]
        else:
            stop_process_group(self.process.pid, timeout)  # what it left behind
        return self.process.wait(timeout=10)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
