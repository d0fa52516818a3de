"""Servers shared by the test suite. A cold vLLM start costs minutes on 2 cores, so every test that
does not need a server of its own shares the session server; destructive tests start their own.

The notebooks (collected by nbmake) share the same session server: before a notebook's kernel starts,
`pytest_runtest_setup` starts the server if no test has yet, and puts its URL in TUTORIAL_SERVER_URL
(unless that variable is already set, e.g. to test the notebooks against a GPU server).
Notebooks listed in NOTEBOOKS_WITH_OWN_SERVER start their own server as part of their lesson."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest

from streaming_tutorial.server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer

# Every server gets an explicit KV cache size, so several can run side by side.
SESSION_SERVER_ARGS = ["--kv-cache-memory-bytes", TEST_KV_CACHE_BYTES]


NOTEBOOKS_WITH_OWN_SERVER = {"01-start-the-server.ipynb", "07-scale-out-with-a-router.ipynb"}

_session_server: LocalServer | None = None


def session_server() -> LocalServer:
    """The session server, started on first use (by a test's fixture or before a notebook)."""
    global _session_server
    if _session_server is None:
        _session_server = LocalServer(SESSION_SERVER_ARGS, log_path=LOG_DIR / "session-server.log").start()
    return _session_server


def pytest_sessionfinish(session, exitstatus):
    global _session_server
    if _session_server is not None:
        _session_server.stop()
        _session_server = None


# A test that uses one of these fixtures talks to a real server, so it is marked `server` (pytest.ini);
# tests that start their own server carry the marker themselves.
SERVER_FIXTURES = {"server", "http", "client", "model_name", "keyed_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.path)).suffix == ".ipynb" or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


def pytest_runtest_setup(item):
    path = Path(str(getattr(item, "path", item.fspath)))
    if path.suffix == ".ipynb" and path.name not in NOTEBOOKS_WITH_OWN_SERVER \
            and "TUTORIAL_SERVER_URL" not in os.environ:
        running = session_server()
        os.environ["TUTORIAL_SERVER_URL"] = running.url
        os.environ.pop("TUTORIAL_API_KEY", None)  # the session server has no API key
        item.add_report_section("setup", "server", f"TUTORIAL_SERVER_URL={running.url}")


@pytest.fixture(scope="session")
def server():
    """The default model on the default flags (plus a small KV cache), shared by the whole session."""
    return session_server()


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def client(server):
    # No retries: a retried request could hide the failure a test is looking for.
    return openai.OpenAI(base_url=server.url_for("v1"), api_key=server.api_key or "unused", timeout=120,
                         max_retries=0)


@pytest.fixture(scope="session")
def model_name(client):
    """Discovered from the server, as vLLM's examples do, rather than hard-coded."""
    return client.models.list().data[0].id
