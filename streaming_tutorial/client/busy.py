"""A busy machine, made on purpose, and a token rate that a collapsed engine cannot stretch into an hour.

A learner's laptop is never idle (a browser, Jupyter, an editor), and an instructor's also draws the classroom
page on the projector. `make busy` (scripts/busy_laptop.py) and notebook 05 measure a server beside these loads:

    with busy_loop():                                # one core kept busy by a process of its own
        rate = await tokens_per_s(url, streams=1, window=10, model=model)

- `busy_loop(niceness)`: `python -c "while True: pass"` in a process of its own (niced if asked), stopped on exit.
- `page_race(url)`: the classroom page racing 16 lanes in headless Chromium, a new race whenever one ends.
- `tokens_per_s(url, streams, window)`: output tokens/s of closed-loop streams over a fixed window of wall time
  (notebook 05 shows it in a cell, `#@save`; tests/test_shown_code.py keeps the two the same).
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

import psutil
from openai import AsyncOpenAI

from streaming_tutorial.client.streams import completion_requests
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


async def tokens_per_s(url: str, streams: int, window: float, model: str, output_len: int = 32,
                       api_key: str | None = None) -> float:
    """Output tokens/s of `streams` closed-loop streams over `window` seconds. With usage on every chunk, a stream
    cut by the window still counts its tokens: a collapsed engine costs one window, not an hour."""
    rng, counted = random.Random(0), 0

    async def stream(client: AsyncOpenAI) -> None:
        nonlocal counted
        while True:  # the next request as soon as one ends, until the window closes
            seen = 0
            request = completion_requests(model, 1, 32, output_len, rng)[0]
            async for chunk in await client.completions.create(**request, stream=True, stream_options={
                    "include_usage": True, "continuous_usage_stats": True}):
                counted += chunk.usage.completion_tokens - seen
                seen = chunk.usage.completion_tokens

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "EMPTY", max_retries=0) as client:
        began = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):  # the window closed: wait_for cancelled the streams
            await asyncio.wait_for(asyncio.gather(*(stream(client) for _ in range(streams))), window)
        return counted / (time.monotonic() - began)
