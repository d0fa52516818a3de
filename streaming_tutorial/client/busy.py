"""A busy machine, made on purpose, and a token rate that a collapsed engine cannot stretch into an hour.

A learner's laptop is never idle (a browser, Jupyter, an editor), and an instructor's also draws the classroom
page on the projector. `make busy` (scripts/busy_laptop.py) and notebook 05 measure a server beside these loads:

    with busy_loop():                                # one core kept busy by a process of its own
        rate = await tokens_per_s(url, streams=1, window=10)

- `busy_loop(niceness)`: `python -c "while True: pass"` in a process of its own (niced if asked), stopped on exit.
- `page_race(url)`: the classroom page racing 16 lanes in headless Chromium, a new race whenever one ends.
- `tokens_per_s(url, streams, window)`: output tokens/s of closed-loop streams over a fixed window of wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from streaming_tutorial.client.latency import async_client, random_token_bodies
from streaming_tutorial.client.sse import DONE, sse_events
from streaming_tutorial.processes.stopping import stop_processes

BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


def gnu_openmp_env() -> dict[str, str]:
    """The environment that gives `streaming_server.py` vLLM's own OpenMP set-up on a CPU: GNU OpenMP (torch's
    libgomp, which vLLM preloads) instead of the Intel OpenMP this server picks on a small CPU. Empty where torch
    ships no libgomp. Notebook 05 and `make busy` race the two."""
    import torch

    gomp = next((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"), None)
    return {"LD_PRELOAD": str(gomp)} if gomp else {}


@contextlib.contextmanager
def busy_loop(niceness: int = 0) -> Iterator[subprocess.Popen]:
    """One core kept busy while the block runs, at nice `niceness` (0: the normal priority of a user's program)."""
    prefix = ["nice", "-n", str(niceness)] if niceness else []
    process = subprocess.Popen([*prefix, *BUSY_LOOP], stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        stop_processes([psutil.Process(process.pid)], grace=2)
        process.wait()


@contextlib.contextmanager
def page_race(url: str, lanes: int = 16, prompt: str = "Tell me a story.") -> Iterator[None]:
    """The classroom page at `url` racing `lanes` lanes in headless Chromium, a new race whenever one ends, from a
    thread of its own (Playwright's sync API runs an event loop, and the caller may want one of its own)."""
    racing, stop, failed = threading.Event(), threading.Event(), []

    def drive() -> None:
        from playwright.sync_api import sync_playwright

        from streaming_tutorial.processes.browser import launch

        try:
            with sync_playwright() as playwright:
                browser = launch(playwright)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 720})
                    page.goto(f"{url}/#race")
                    page.fill("#race-prompts", prompt)
                    page.fill("#race-n", str(lanes))
                    page.evaluate("""() => { const again = () => { const start = document.querySelector('#race-start');
                        if (!start.disabled) start.click(); setTimeout(again, 500); }; again(); }""")
                    racing.set()
                    while not stop.is_set():
                        page.wait_for_timeout(200)  # lets the page's scripts run while we wait
                finally:
                    browser.close()
        except Exception as error:  # said by the caller, in its own thread
            failed.append(error)
            racing.set()

    thread = threading.Thread(target=drive, name="page-race", daemon=True)
    thread.start()
    racing.wait(120)
    try:
        if failed:
            raise RuntimeError(f"the page's race did not start: {failed[0]}")
        yield
    finally:
        stop.set()
        thread.join(60)


async def tokens_per_s(url: str, streams: int, window: float, model: str | None = None, output_len: int = 32,
                       api_key: str | None = None, seed: int = 0) -> float:
    """Output tokens/s of `streams` closed-loop streams (each sends a new greedy request of `output_len` tokens
    as soon as its last one ends) over `window` seconds of wall time. A stream still running when the window
    closes counts the tokens it has so far (the server reports usage on every chunk), so a collapsed engine
    costs one window, not the time its requests would take."""
    rng = random.Random(seed)
    counted = 0
    deadline = time.monotonic() + window

    async def stream(client: httpx.AsyncClient) -> None:
        nonlocal counted
        while time.monotonic() < deadline:
            body = {**random_token_bodies(model or await served_model(client), 1, 32, output_len, rng)[0],
                    "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            seen = 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    for event in sse_events((line,)):
                        if event != DONE and (usage := event.get("usage")):
                            counted += usage["completion_tokens"] - seen
                            seen = usage["completion_tokens"]

    async with async_client(url, api_key, concurrency=streams, timeout=window + 60) as client:
        model = model or await served_model(client)
        began = time.monotonic()
        tasks = [asyncio.create_task(stream(client)) for _ in range(streams)]
        done, _ = await asyncio.wait(tasks, timeout=window)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:  # a stream that failed before the window closed: say why rather than count zero
            if task.exception():
                raise task.exception()
        return counted / (time.monotonic() - began)


async def served_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]
