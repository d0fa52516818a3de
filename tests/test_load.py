"""Load on the shared session server: 64 concurrent streams stay separate and complete, /health stays
up meanwhile; a bounded soak of a few hundred short requests does not grow the server's memory."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from server_checks import metrics, tree_rss

from streaming_tutorial.client.metrics import metric
from streaming_tutorial.client.sse import DONE

CONCURRENT_STREAMS = 64
PROMPTS = ["The capital of France is", "List three colors:", "Write a haiku about the sea.",
           "Count from one to five.", "Why is the sky blue? Explain briefly, as to a child, in one sentence.",
           "Translate 'good morning' into Spanish.", "Name a planet.",
           "Describe a cat in exactly one short sentence, mentioning its fur, its eyes and its tail."]
# The soak: a few hundred short requests, at most this long; the server tree may grow by at most this much.
# On a busy 2-core machine 240 requests took 168 s once and did not finish in 240 s another time (191):
# the soak stops at the time cap, and must have sent at least SOAK_MIN_REQUESTS by then.
SOAK_REQUESTS = 240
SOAK_MIN_REQUESTS = 150
SOAK_MAX_SECONDS = 240
SOAK_CONCURRENCY = 16
SOAK_RSS_BOUND = 100 << 20


def request_for(i: int, model: str) -> tuple[str, dict]:
    """Request i of the burst: 32 distinct configurations (chat/completions x 8 prompts x 2 lengths),
    each sent twice, so identical requests can be compared at temperature 0."""
    config = i % 32
    prompt = PROMPTS[(config // 2) % 8]
    body = {"model": model, "max_tokens": (6, 20)[config // 16], "temperature": 0, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    if config % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def read_stream(client: httpx.AsyncClient, path: str, body: dict, in_flight: list[int]) -> dict:
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    payload = line[len("data:"):].strip()
                    events.append(payload if payload == DONE else json.loads(payload))
        finally:
            in_flight[0] -= 1
    return {"path": path, "body": body, "events": events}


def text_of(chunk: dict) -> str:
    choice = chunk["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def poll_health(base_url: str, stop: asyncio.Event, statuses: list[int]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while not stop.is_set():
            statuses.append((await client.get("/health")).status_code)
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass


async def burst(server, model: str):
    limits = httpx.Limits(max_connections=CONCURRENT_STREAMS + 8, max_keepalive_connections=CONCURRENT_STREAMS)
    in_flight = [0, 0]  # current, maximum
    health: list[int] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300, limits=limits) as client:
        poller = asyncio.create_task(poll_health(server.url, stop, health))
        try:
            results = await asyncio.gather(*(read_stream(client, *request_for(i, model), in_flight)
                                             for i in range(CONCURRENT_STREAMS)))
        finally:
            stop.set()
            await poller
    return results, in_flight[1], health


def test_64_concurrent_streams_complete_and_stay_separate(server, model_name):
    start = time.perf_counter()
    results, max_in_flight, health = asyncio.run(burst(server, model_name))
    elapsed = time.perf_counter() - start
    print(f"\n{CONCURRENT_STREAMS} streams in {elapsed:.1f} s; at most {max_in_flight} open at once; "
          f"/health polled {len(health)} times")

    assert len(results) == CONCURRENT_STREAMS
    assert max_in_flight >= CONCURRENT_STREAMS // 2, "the streams did not overlap: not a concurrency test"
    assert len(health) >= 3 and set(health) == {200}, health

    ids, texts = set(), {}
    for i, result in enumerate(results):
        events, body = result["events"], result["body"]
        assert events.count(DONE) == 1 and events[-1] == DONE, f"stream {i} did not end with [DONE]"
        chunks = events[:-1]
        assert not any("error" in c for c in chunks), chunks
        stream_ids = {c["id"] for c in chunks}
        assert len(stream_ids) == 1, f"stream {i} mixes ids {stream_ids}"
        ids |= stream_ids
        assert {c["model"] for c in chunks} == {model_name}
        usage_chunk, token_chunks = chunks[-1], [c for c in chunks[:-1] if c["choices"]]
        assert usage_chunk["choices"] == [] and usage_chunk["usage"], usage_chunk
        streamed = [t for c in token_chunks for t in (c["choices"][0].get("token_ids") or [])]
        usage = usage_chunk["usage"]
        assert len(streamed) == usage["completion_tokens"], f"stream {i}: {len(streamed)} ids vs usage {usage}"
        assert 1 <= usage["completion_tokens"] <= body["max_tokens"]
        finish = [c["choices"][0]["finish_reason"] for c in token_chunks if c["choices"][0]["finish_reason"]]
        assert len(finish) == 1 and finish[0] in ("stop", "length"), finish
        assert {c["choices"][0]["index"] for c in token_chunks} == {0}
        key = (result["path"], json.dumps(body, sort_keys=True))
        texts.setdefault(key, []).append(("".join(text_of(c) for c in token_chunks), streamed))
    assert len(ids) == CONCURRENT_STREAMS, "two streams shared an id"
    assert len(texts) == CONCURRENT_STREAMS // 2
    for key, pair in texts.items():
        assert len(pair) == 2
        assert pair[0] == pair[1], f"identical greedy requests differ: {key}: {pair}"
    # Different prompts give different answers: a stream did not receive another request's tokens.
    assert len({tuple(p[0][1]) for p in texts.values()}) > len(texts) // 2


async def soak(server, model: str, count: int, seconds: float) -> tuple[int, int]:
    done, failures = 0, 0
    deadline = time.monotonic() + seconds
    queue = list(range(count))

    async def worker(client):
        nonlocal done, failures
        while queue and time.monotonic() < deadline:
            i = queue.pop()
            path, body = request_for(i * 7 + 3, model)
            body = {**body, "max_tokens": 2 + i % 4, "temperature": 0.7, "seed": i}  # vary the outputs
            if i % 3 == 0:
                body["stream"] = False
                body.pop("stream_options")
                response = await client.post(path, json=body)
                ok = response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
            else:
                async with client.stream("POST", path, json=body) as response:
                    lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
                ok = response.status_code == 200 and lines[-1] == f"data: {DONE}"
            done += 1
            failures += not ok

    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(SOAK_CONCURRENCY)))
    return done, failures


def test_soak_does_not_grow_server_memory(server, model_name):
    asyncio.run(soak(server, model_name, 48, 60))  # warm-up: batch shapes, caches, allocator pools
    before = tree_rss(server)
    finished_before = metric(metrics(server.url), "vllm:request_success_total")
    start = time.perf_counter()
    done, failures = asyncio.run(soak(server, model_name, SOAK_REQUESTS, SOAK_MAX_SECONDS))
    elapsed = time.perf_counter() - start
    after = tree_rss(server)
    finished = metric(metrics(server.url), "vllm:request_success_total") - finished_before
    print(f"\nsoak: {done} requests in {elapsed:.0f} s ({failures} failed); server tree RSS "
          f"{before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB ({(after - before) / 2**20:+.1f} MiB; "
          f"bound +{SOAK_RSS_BOUND / 2**20:.0f} MiB)")
    assert failures == 0
    assert done >= SOAK_MIN_REQUESTS, f"only {done} requests in {SOAK_MAX_SECONDS} s: the soak proves little"
    assert finished >= done, "the engine did not count every request as finished"
    assert after - before < SOAK_RSS_BOUND
    assert httpx.get(server.url_for("health"), timeout=10).status_code == 200
