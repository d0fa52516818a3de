"""Servers shared by the test suite. A cold vLLM start costs minutes on 2 cores, so every test that
does not need a server of its own shares the session server; destructive tests start their own.

The notebooks (collected by nbmake) share the same session server: before a notebook's kernel starts,
`pytest_runtest_setup` starts the server if no test has yet, and puts its URL in TUTORIAL_SERVER_URL
(unless that variable is already set, e.g. to test the notebooks against a GPU server).
Notebooks listed in NOTEBOOKS_WITH_OWN_SERVER start their own server as part of their lesson.

A notebook on the shared server runs beside a `BusyNeighbour`: another client streaming NEIGHBOUR_STREAMS chats
at once, as a classmate's race does on a workshop's server. A lesson must pass on a busy server (issue 19)."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from streaming_tutorial.processes.local_server import LOG_DIR, TEST_KV_CACHE_BYTES, LocalServer

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
# A test that uses this fixture drives a real Chromium (tests/test_page.py, tests/test_lab.py): marked `browser`.
BROWSER_FIXTURE = "browser"


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if Path(str(item.path)).suffix == ".ipynb" or SERVER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.server)
        if BROWSER_FIXTURE in fixtures:
            item.add_marker(pytest.mark.browser)


# `make test` installs a browser first (`make browser`) and sets this, so there a missing one fails; a quick
# `pytest -m "not server"` on a machine without one skips the browser tests and says how to get one.
REQUIRE_BROWSER = os.environ.get("TUTORIAL_REQUIRE_BROWSER") == "1"
_chromium: list[str | None] = []  # found once per session


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (streaming_tutorial/processes/browser.py), one per test module."""
    from playwright.sync_api import sync_playwright

    from streaming_tutorial.processes.browser import launch

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


def chromium_or_skip(item) -> None:
    if REQUIRE_BROWSER or item.get_closest_marker("browser") is None:
        return
    if not _chromium:
        from streaming_tutorial.processes.browser import find
        _chromium.append(find())
    if _chromium[0] is None:
        from streaming_tutorial.processes.browser import HOW_TO_GET_ONE
        pytest.skip(HOW_TO_GET_ONE)


# The busy neighbour's streams at once (TUTORIAL_NEIGHBOUR_STREAMS=0 turns it off): 8, as the page's race of a
# classmate or two. Short answers, so each stream ends and starts again while a notebook runs.
NEIGHBOUR_STREAMS = int(os.environ.get("TUTORIAL_NEIGHBOUR_STREAMS", "8"))
NEIGHBOUR_MAX_TOKENS = 48


class BusyNeighbour:
    """Another user of the server: `streams` chat streams at once, each sent again as soon as it ends, from a
    thread of this process (the notebook runs in its own kernel process), until `stop()`. A refusal (429, 503)
    or an error is counted and retried a second later, as a patient client would."""

    def __init__(self, url: str, api_key: str | None, streams: int) -> None:
        self.url, self.api_key, self.streams = url, api_key, streams
        self.chunks = 0  # stream chunks received
        self.answers = 0  # streams read to [DONE]
        self.refused: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.run()), daemon=True, name="busy-neighbour")

    def start(self) -> BusyNeighbour:
        self.thread.start()
        return self

    def stop(self) -> str:
        """Stop every stream (the server aborts them) and say what the neighbour did."""
        self.stopping.set()
        self.thread.join(60)
        return (f"busy neighbour: {self.streams} streams at once, {self.answers} answers read to the end, "
                f"{self.chunks} chunks; refused or failed: {dict(self.refused) or 'none'}")

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=120,
                                     limits=httpx.Limits(max_connections=self.streams)) as client:
            lanes = [asyncio.ensure_future(self.lane(client, i)) for i in range(self.streams)]
            await asyncio.to_thread(self.stopping.wait)
            for lane in lanes:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    async def lane(self, client: httpx.AsyncClient, index: int) -> None:
        model = ""
        for round_ in itertools.count():
            try:
                model = model or (await client.get("/v1/models")).json()["data"][0]["id"]
                body = {"model": model, "stream": True, "max_tokens": NEIGHBOUR_MAX_TOKENS, "temperature": 0.8,
                        "messages": [{"role": "user", "content": f"Tell story {round_} of lane {index}."}]}
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        self.refused[str(response.status_code)] += 1
                        await asyncio.sleep(1)
                        continue
                    async for line in response.aiter_lines():
                        self.chunks += line.startswith("data: {")
                        self.answers += line == "data: [DONE]"
            except httpx.HTTPError as error:
                self.refused[type(error).__name__] += 1
                await asyncio.sleep(1)


_neighbours: dict[str, BusyNeighbour] = {}


def pytest_runtest_setup(item):
    chromium_or_skip(item)
    path = Path(str(getattr(item, "path", item.fspath)))
    if path.suffix != ".ipynb" or path.name in NOTEBOOKS_WITH_OWN_SERVER:
        return
    if "TUTORIAL_SERVER_URL" not in os.environ:
        running = session_server()
        os.environ["TUTORIAL_SERVER_URL"] = running.url
        os.environ.pop("TUTORIAL_API_KEY", None)  # the session server has no API key
        item.add_report_section("setup", "server", f"TUTORIAL_SERVER_URL={running.url}")
    # On a server with keys the neighbour needs a key of its own: sharing the notebook's would take the
    # notebook's own requests in flight (the per-key limit), which no real neighbour does.
    neighbour_key = os.environ.get("TUTORIAL_NEIGHBOUR_API_KEY") or None
    if NEIGHBOUR_STREAMS and (neighbour_key or not os.environ.get("TUTORIAL_API_KEY")):
        _neighbours[item.nodeid] = BusyNeighbour(os.environ["TUTORIAL_SERVER_URL"], neighbour_key,
                                                 NEIGHBOUR_STREAMS).start()


def pytest_runtest_teardown(item):
    if (neighbour := _neighbours.pop(item.nodeid, None)) is not None:
        summary = neighbour.stop()
        item.add_report_section("teardown", "neighbour", summary)
        print(f"\n{item.name}: {summary}")
        # Else the notebook did not run beside a busy server, and its pass would prove less than it claims.
        assert neighbour.chunks, f"the busy neighbour got nothing while {item.name} ran: {summary}"


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
