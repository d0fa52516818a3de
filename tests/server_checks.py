"""Helpers for the robustness tests (load, disconnect, bad input, API key, shutdown): read vLLM's
Prometheus metrics, measure a server's memory, poll with deadlines, start a destructive test's own server."""

from __future__ import annotations

import httpx
import psutil

from streaming_tutorial.client.metrics import Samples, samples
from streaming_tutorial.client.waiting import wait_until
from streaming_tutorial.processes.local_server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer

# Destructive tests start their own servers; eager mode skips torch.compile, so they are ready sooner.
OWN_SERVER_ARGS = ["--enforce-eager", "--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES]
ERROR_FIELDS = {"message", "type", "param", "code"}
# The `keyed_server` fixture's flags (tests/conftest.py): a workshop server behind a key.
WORKSHOP_KEY = "workshop-secret-key"
WORKSHOP_MODEL = "workshop-model"
WORKSHOP_ROOT_PATH = "/tutorial"
WORKSHOP_MAX_MODEL_LEN = 1024

# Poll with a deadline: the notebooks' function (a TimeoutError names what was waited for).
wait_for = wait_until


def metrics(base_url: str, headers: dict | None = None) -> Samples:
    """Every sample of the server's /metrics, read with the project's one Prometheus reader."""
    return samples(httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text)


def tree_rss(server: LocalServer) -> int:
    """Resident memory of the server's whole process tree (API server, engine, workers), in bytes."""
    total = 0
    for proc in server.process_tree():
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def error_of(response: httpx.Response) -> dict:
    """The `error` object of vLLM's error shape; fails if the body has another shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


def own_server(name: str, extra_args: list[str] = (), **kwargs) -> LocalServer:
    return LocalServer([*OWN_SERVER_ARGS, *extra_args], log_path=LOG_DIR / f"{name}.log", **kwargs)
