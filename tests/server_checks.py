"""Helpers for the robustness tests (load, disconnect, bad input, API key, shutdown): read vLLM's
Prometheus metrics, measure a server's memory, poll with deadlines, start a destructive test's own server."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

import httpx
import psutil

from streaming_tutorial.server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer

# Destructive tests start their own servers; eager mode skips torch.compile (start ~1 min instead of 2-4).
OWN_SERVER_ARGS = ["--enforce-eager", "--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES]
ERROR_FIELDS = {"message", "type", "param", "code"}
T = TypeVar("T")
# The `keyed_server` fixture's flags (tests/conftest.py): a workshop server behind a key.
WORKSHOP_KEY = "workshop-secret-key"
WORKSHOP_MODEL = "workshop-model"
WORKSHOP_ROOT_PATH = "/tutorial"
WORKSHOP_MAX_MODEL_LEN = 1024

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def metrics(base_url: str, headers: dict | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(name, frozenset(label=value)): value}."""
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text
    samples = {}
    for line in text.splitlines():
        if match := _SAMPLE.match(line):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def wait_for(condition: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


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
