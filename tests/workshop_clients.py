"""Clients of the workshop server (`keyed_server`): one streamed chat, and the hog of the hog test.

The hog runs in a process of its own, as it would on a laptop of its own: its 64 streams, re-sent after every
429, keep a client busy, and in the test's own process they would delay the neighbour's requests on the client
side (on 2 cores, by seconds), which is not what the test measures. This module imports no vLLM, so that process
starts in a fraction of a second."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
from server_checks import WORKSHOP_MODEL

from streaming_tutorial.client.metrics import metric, samples

HOG_STREAMS = 64
HOG_PROMPTS = 1000
HOG_LIMIT = 4  # the hog's requests in flight: the keys file's default limit (tests/conftest.py, keyed_server)
AT_LIMIT_TIMEOUT = 60.0


@dataclass
class Stream:
    """One streamed chat request: its status, when its first token came, its events, its usage."""
    status: int | None = None
    headers: dict = field(default_factory=dict)
    error: dict | None = None
    ttft: float | None = None
    events: list = field(default_factory=list)
    done: bool = False
    completion_tokens: int | None = None
    started: float = 0.0
    headers_at: float | None = None  # seconds from `started` to the response's status line and headers
    ended: float | None = None


async def stream_chat(client: httpx.AsyncClient, key: str, record: Stream, max_tokens: int = 16,
                      long: bool = False, prompt: str = "Name three colors.") -> Stream:
    body = {"model": WORKSHOP_MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}],
            **({"ignore_eos": True} if long else {})}
    record.started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        record.status, record.headers = response.status_code, dict(response.headers)
        record.headers_at = time.perf_counter() - record.started
        if response.status_code != 200:
            record.error = json.loads(await response.aread())["error"]
            record.ended = time.perf_counter()
            return record
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                record.done = True
                break
            event = json.loads(payload)
            record.events.append(event)
            if record.ttft is None and any(c["delta"].get("content") for c in event.get("choices", ())):
                record.ttft = time.perf_counter() - record.started
            if event.get("usage"):
                record.completion_tokens = event["usage"]["completion_tokens"]
    record.ended = time.perf_counter()
    return record


def async_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(180, connect=30),
                             limits=httpx.Limits(max_connections=200, max_keepalive_connections=0))


def hog(url: str, key: str, max_tokens: int, stop, results) -> None:
    """Key A, the hog, until `stop` (a multiprocessing Event) is set: `n: 16000`, then 64 concurrent long streams,
    each re-sent after the Retry-After of its 429, then, once 4 of them are in flight, a completion with 1,000
    prompts. Meanwhile it reads the server's /metrics a few times a second. Sends to `results` (a Connection):
    the two statuses with the parameter each error names, every stream's status, and the timeline (seconds since
    the streams began, the hog's requests in flight as the server counts them, running and waiting requests in
    the engine)."""
    results.send(asyncio.run(_hog(url, key, max_tokens, stop)))


async def _hog(url: str, key: str, max_tokens: int, stop) -> dict:
    auth = {"Authorization": f"Bearer {key}"}
    statuses: list[int | None] = []
    timeline: list[tuple[float, float, float, float]] = []
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            record = Stream()
            try:
                await stream_chat(client, key, record, max_tokens, long=True, prompt="Tell me a very long story.")
            finally:  # also when cancelled at the end: a stream still open counts
                statuses.append(record.status)
            if record.status == 429:
                await asyncio.sleep(int(record.headers["retry-after"]))

    async def watch(client: httpx.AsyncClient) -> None:
        while True:
            m = samples((await client.get("/metrics")).text)
            timeline.append((time.perf_counter() - t0, metric(m, "tutorial:requests_in_flight", key="hog"),
                             metric(m, "vllm:num_requests_running"), metric(m, "vllm:num_requests_waiting")))
            await asyncio.sleep(0.25)

    def outcome(response: httpx.Response) -> tuple[int, str | None]:
        return response.status_code, response.json().get("error", {}).get("param")

    async with async_client(url) as client:
        huge_n = await client.post("/v1/chat/completions", headers=auth,
                                   json={"model": WORKSHOP_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                         "n": 16000})
        tasks = [asyncio.create_task(watch(client)), *(asyncio.create_task(worker(client))
                                                       for _ in range(HOG_STREAMS))]
        # The batch goes out once the hog is at its limit, as the server counts it: it is still refused for
        # its size (400), not for the hog's requests in flight (429).
        deadline = time.perf_counter() + AT_LIMIT_TIMEOUT
        while not any(hog_in_flight == HOG_LIMIT for _, hog_in_flight, _, _ in timeline):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the hog's streams were not {HOG_LIMIT} in flight after {AT_LIMIT_TIMEOUT} s")
            await asyncio.sleep(0.1)
        batch = await client.post("/v1/completions", headers=auth,
                                  json={"model": WORKSHOP_MODEL, "prompt": ["Once upon a time"] * HOG_PROMPTS,
                                        "max_tokens": 16})
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()  # the hog's open streams: their clients go away, the engine aborts them
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"huge_n": outcome(huge_n), "batch": outcome(batch), "statuses": statuses, "timeline": timeline,
            "t0": t0}
