"""What the notebooks share: "use the server I was given, or start a local one", stopping that server
whatever happens to the kernel, and reading one number from vLLM's Prometheus `/metrics`.

    conn = connect()                  # TUTORIAL_SERVER_URL / TUTORIAL_API_KEY, else a local server
    client = openai.OpenAI(base_url=conn.url_for("v1"), api_key=conn.api_key or "unused")
    ...
    conn.close()                      # stops the local server, if this notebook started one

A server this module starts is stopped three ways, so none outlives its notebook: `close()` in the last
cell, an `atexit` hook when the kernel shuts down after a failed cell, and a small watchdog process that
kills the server's process group if the kernel dies without running `atexit` (killed, crashed).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from streaming_tutorial.server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer

URL_VARIABLE = "TUTORIAL_SERVER_URL"
KEY_VARIABLE = "TUTORIAL_API_KEY"

# Runs in its own session, so it survives whatever kills the kernel; exits once the server's group is gone.
_WATCHDOG = """
import os, signal, sys, time
kernel, group = int(sys.argv[1]), int(sys.argv[2])
def alive(kill):
    try:
        kill()
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while alive(lambda: os.killpg(group, 0)):
    if not alive(lambda: os.kill(kernel, 0)):
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and alive(lambda: os.killpg(group, 0)):
            time.sleep(0.5)
        if alive(lambda: os.killpg(group, 0)):
            os.killpg(group, signal.SIGKILL)
        break
    time.sleep(1)
"""


def kill_process_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group led by `pid`, wait up to `timeout`, then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # reap the leader if it is our child, or its zombie would keep the group "alive"
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_with_kernel(pid: int) -> subprocess.Popen:
    """Make sure the process group led by `pid` (a server started with `start_new_session=True`) dies with
    this Python process: an `atexit` hook for a normal exit, and a watchdog process for a hard kill.
    Returns the watchdog (it exits by itself once the group is gone)."""
    atexit.register(kill_process_group, pid)
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid)],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@dataclass
class Connection:
    """A server to talk to: one we were given (URL and key from the environment) or one we started."""

    url: str
    api_key: str | None = None
    server: LocalServer | None = None
    health: dict | None = field(default=None, repr=False)

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, timeout: float = 300.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def model(self) -> str:
        """The first served model's name, from /v1/models (as vLLM's examples discover it)."""
        response = httpx.get(self.url_for("v1", "models"), headers=self.headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]

    def close(self) -> None:
        """Stop the server if this notebook started it; a server we were given is left running."""
        if self.server is not None:
            code = self.server.stop()
            print(f"stopped the local server (exit code {code})")
            self.server = None


class _KernelBoundServer(LocalServer):
    """A LocalServer whose process group is tied to this kernel from the moment it is launched."""

    def wait_until_healthy(self) -> dict | None:
        if not getattr(self, "_guarded", False):
            stop_with_kernel(self.process.pid)
            self._guarded = True
        return super().wait_until_healthy()


def wait_until_healthy(url: str, timeout: float = 60.0) -> dict | None:
    """Poll `url`/health until it answers 200. Returns its JSON, or None for plain vLLM's empty body."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url.rstrip("/") + "/health", timeout=5)
            if response.status_code == 200:
                return response.json() if response.content.strip() else None
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}"
        time.sleep(1)
    raise RuntimeError(f"{url} is not healthy after {timeout:.0f} s ({last})")


def connect(args: list[str] | tuple[str, ...] = (), log_name: str = "notebook-server.log") -> Connection:
    """The server named by TUTORIAL_SERVER_URL (key: TUTORIAL_API_KEY), or else `streaming_server.py` with
    the default model started on a free port (with an explicit small KV cache) and stopped with the kernel."""
    url = os.environ.get(URL_VARIABLE)
    api_key = os.environ.get(KEY_VARIABLE) or None
    if url:
        health = wait_until_healthy(url)
        print(f"using the server at {url} ({URL_VARIABLE}); /health: {health or '200, empty body'}")
        return Connection(url.rstrip("/"), api_key, None, health)
    server = _KernelBoundServer(["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES, *args], api_key=api_key,
                                log_path=LOG_DIR / log_name, env={"VLLM_LOGGING_COLOR": "0"})
    print(f"{URL_VARIABLE} is not set: starting a local server (2-4 minutes on a 2-core CPU)\n"
          f"  $ {' '.join(server.argv)}\n  log: {server.log_path}", flush=True)
    started = time.monotonic()
    server.start()
    health = wait_until_healthy(server.url)
    print(f"server healthy after {time.monotonic() - started:.0f} s at {server.url}")
    return Connection(server.url, api_key, server, health)


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` in Prometheus text `text` whose labels include `labels`
    (0.0 when none matches). E.g. metric(text, "vllm:request_success_total", finished_reason="abort")."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] != name:
            continue
        found = dict(_LABEL.findall(match["labels"] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total
