"""Many streams at once with the `openai` client: the code notebook 05 shows, kept here for the later lessons.

Notebook 05 shows `stream_and_time` and `closed_loop` in its cells (marked `#@save`), character for character
(tests/test_shown_code.py keeps the two the same); notebooks 07 and 08 import them from here.

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0) as client:
        run = await closed_loop(client, completion_requests(model, 16, 16, 24, random.Random(0)), concurrency=8)
    print(summarize_run(run).report())
"""

from __future__ import annotations

import asyncio
import random
import time

from openai import AsyncOpenAI

from streaming_tutorial.client.latency import RequestResult, RunResult, random_token_bodies


def completion_requests(model: str, count: int, input_len: int, output_len: int, rng: random.Random) -> list[dict]:
    """`random_token_bodies` as keyword arguments of `client.completions.create`: `count` prompts of `input_len`
    random token ids, exactly `output_len` tokens out (vLLM's `ignore_eos`, an extension, goes in `extra_body`)."""
    return [{**{key: value for key, value in body.items() if key != "ignore_eos"}, "extra_body": {"ignore_eos": True}}
            for body in random_token_bodies(model, count, input_len, output_len, rng)]


async def stream_and_time(client: AsyncOpenAI, request: dict, result: RequestResult | None = None) -> RequestResult:
    """One streamed completion, each chunk stamped with the clock as in notebook 04. Pass `result` to watch it
    fill while the stream runs."""
    result = result or RequestResult()
    result.start = time.perf_counter()
    stream = await client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter() - result.start
        if chunk.choices:  # a token; the last chunk, with the usage, has no choices
            result.chunk_times.append(now)
            result.text += chunk.choices[0].text
            if result.ttft_content is None and chunk.choices[0].text:
                result.ttft_content = now
        if chunk.usage:
            result.output_tokens = chunk.usage.completion_tokens
            result.prompt_tokens = chunk.usage.prompt_tokens
    return result


async def closed_loop(client: AsyncOpenAI, requests: list[dict], concurrency: int) -> RunResult:
    """Send every request, `concurrency` at a time: a new one starts as soon as one ends."""
    slots = asyncio.Semaphore(concurrency)

    async def one(request: dict) -> RequestResult:
        async with slots:
            return await stream_and_time(client, request)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(request) for request in requests))
    return RunResult(concurrency, list(results), time.perf_counter() - start)
