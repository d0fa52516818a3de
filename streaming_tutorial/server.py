"""Start `streaming_server.py` as a child process, wait until it is healthy, and stop it completely.

Used by the tests, the notebooks and the benchmark, in the style of vLLM's own `RemoteOpenAIServer`:

    with LocalServer(["--max-num-seqs", "16"]) as server:
        client = openai.OpenAI(base_url=server.url_for("v1"), api_key=server.api_key)
        ...

The server runs in its own process group with its output in a log file; `stop()` sends SIGTERM to the
whole group, waits, then SIGKILLs whatever of the process tree is left (vLLM's engine and worker
processes included), so nothing outlives the `with` block.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from streaming_tutorial.lifecycle import kill_survivors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = PROJECT_ROOT / "streaming_server.py"
LOG_DIR = PROJECT_ROOT / "logs"  # gitignored; servers started by tests and notebooks log here
# A cold start compiles the model (about 2-4 minutes on 2 busy cores); a warm one takes about half.
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


class LocalServer:
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

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> "LocalServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.argv, cwd=PROJECT_ROOT, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        try:
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_healthy(self) -> dict | None:
        """Poll /health until it answers 200; return its JSON (None for plain vLLM's empty body)."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"server exited with code {self.process.returncode} before it was "
                                       f"healthy; last log lines ({self.log_path}):\n{tail(self.log_path)}")
            try:
                response = httpx.get(self.url_for("health"), timeout=5)
                if response.status_code == 200:
                    return response.json() if response.content else None
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise ServerStartError(f"server not healthy after {self.startup_timeout:.0f} s; last log lines "
                               f"({self.log_path}):\n{tail(self.log_path)}")

    def process_tree(self) -> list[psutil.Process]:
        """The server process and every process it started (engine, workers, resource tracker)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group, wait up to `timeout`, then SIGKILL what is left. Returns the exit code."""
        if self.process is None:
            return None
        tree = self.process_tree()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        kill_survivors(tree, timeout)
        return self.process.wait(timeout=10)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
