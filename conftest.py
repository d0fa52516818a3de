"""Servers shared by the test suite. A cold vLLM start costs minutes on 2 cores, so every test that
does not need a server of its own shares the session server; destructive tests start their own."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from streaming_tutorial.server import TEST_KV_CACHE_BYTES, LocalServer

LOG_DIR = Path(__file__).resolve().parent / "logs"
# Every server gets an explicit KV cache size, so several can run side by side.
SESSION_SERVER_ARGS = ["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES]


@pytest.fixture(scope="session")
def server():
    """The default model on the default flags (plus a small KV cache), shared by the whole session."""
    LOG_DIR.mkdir(exist_ok=True)
    with LocalServer(SESSION_SERVER_ARGS, log_path=LOG_DIR / "session-server.log") as running:
        yield running


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.url_for("v1"), api_key=server.api_key or "unused", timeout=120)


@pytest.fixture(scope="session")
def model_name(client):
    """Discovered from the server, as vLLM's examples do, rather than hard-coded."""
    return client.models.list().data[0].id
