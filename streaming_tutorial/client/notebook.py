"""What the notebooks share: "use the server I was given, or the running `make serve`, or start a local one",
and stopping a server this notebook started whatever happens to the kernel.

    conn = connect()                  # TUTORIAL_SERVER_URL / TUTORIAL_API_KEY, else make serve's, else a new one
    client = openai.OpenAI(base_url=conn.url_for("v1"), api_key=conn.api_key or "unused")
    ...
    conn.close()                      # stops the local server, if this notebook started it

A server this module starts is stopped three ways, so none outlives its notebook: `close()` in the last
cell, an `atexit` hook when the kernel shuts down after a failed cell, and a small watchdog process that
stops the server's process group if the kernel dies without running `atexit` (killed, crashed).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from streaming_tutorial.processes.local_server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer, wait_until_healthy
from streaming_tutorial.processes.stopping import stop_process_group

URL_VARIABLE = "TUTORIAL_SERVER_URL"
KEY_VARIABLE = "TUTORIAL_API_KEY"
MAKE_SERVE_URL = "http://127.0.0.1:8000"  # streaming_server.py's default --host and --port
# A given server may still be starting (e.g. `make serve` in another terminal): wait this long for it.
GIVEN_SERVER_TIMEOUT = 60.0

def stop_with_kernel(pid: int) -> subprocess.Popen:
    """Make sure the process group led by `pid` (a server started with `start_new_session=True`) dies with
    this Python process: an `atexit` hook for a normal exit, and a watchdog process for a hard kill.
    Returns the watchdog (it exits by itself once the group is gone)."""
    atexit.register(stop_process_group, pid)
    return subprocess.Popen([sys.executable, "-m", "streaming_tutorial.processes.stopping", str(os.getpid()), str(pid)],
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


def connect(args: list[str] | tuple[str, ...] = (), log_name: str = "notebook-server.log") -> Connection:
    """The server to use, in this order, saying which one and why:

    1. TUTORIAL_SERVER_URL (key: TUTORIAL_API_KEY), when set: `make test` sets it to its session server.
    2. `make serve`'s address, http://127.0.0.1:8000, when a server there answers /health: one server for the
       whole course instead of one per notebook.
    3. Else `streaming_server.py` with the default model (plus `args`) on a free port, with an explicit small
       KV cache, stopped with the kernel."""
    url = os.environ.get(URL_VARIABLE)
    api_key = os.environ.get(KEY_VARIABLE) or None
    if url:
        health = wait_until_healthy(url, GIVEN_SERVER_TIMEOUT)
        print(f"using the server at {url} ({URL_VARIABLE} is set); /health: {health or '200, empty body'}")
        return Connection(url.rstrip("/"), api_key, None, health)
    if health := running_health(MAKE_SERVE_URL):
        print(f"using the server at {MAKE_SERVE_URL}: {URL_VARIABLE} is not set, and `make serve`'s address "
              f"answered /health ({health.get('model', 'a model')}, {health.get('device', '?')})")
        return Connection(MAKE_SERVE_URL, api_key, None, health)
    print(f"{URL_VARIABLE} is not set and nothing answers at {MAKE_SERVE_URL}: starting a local server")
    return start_local(args, api_key=api_key, log_name=log_name)


def start_local(args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                api_key: str | None = None, log_name: str = "notebook-server.log") -> Connection:
    """`streaming_server.py` with the default model (plus `args` and `env`) on a free port, with an explicit small
    KV cache (so it fits beside another server), stopped with the kernel: close() it when done."""
    server = _KernelBoundServer(["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES, *args], api_key=api_key,
                                log_path=LOG_DIR / log_name, env={"VLLM_LOGGING_COLOR": "0", **(env or {})})
    shown_env = " ".join(f"{name}={value}" for name, value in (env or {}).items())
    print(f"starting a local server (1-4 minutes on a 2-core CPU)\n  $ {shown_env + ' ' if shown_env else ''}"
          f"{' '.join(server.argv)}\n  log: {server.log_path}", flush=True)
    started = time.monotonic()
    server.start()
    print(f"server healthy after {time.monotonic() - started:.0f} s at {server.url}")
    return Connection(server.url, api_key, server, server.health)


def running_health(url: str) -> dict | None:
    """/health's JSON if a server at `url` answers 200 right now (an empty body counts, as plain vLLM's)."""
    try:
        response = httpx.get(url + "/health", timeout=2)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return {}
