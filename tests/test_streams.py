"""The request code the notebooks show (streaming_tutorial/client/streams.py, token_time.py), against a mock
server speaking vLLM's completions stream: no vLLM server needed. The `openai` client carries its own HTTP stack
(`httpx2`), so its mock transport is httpx2's; the `httpx` client that reads /metrics gets httpx's."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import httpx2
import openai
import pytest

from streaming_tutorial.client.latency import summarize_run
from streaming_tutorial.client.streams import closed_loop, completion_requests, stream_and_time
from streaming_tutorial.client.token_time import prefix_cache_trial, timed_stream


def completion_chunk(text: str | None, usage: dict | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]
    return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m", "choices": choices,
            "usage": usage}


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
SSE = "".join(f"data: {json.dumps(event)}\n\n" for event in [
    completion_chunk(" Hel"), completion_chunk("lo"), completion_chunk("!"), completion_chunk(None, USAGE),
]) + "data: [DONE]\n\n"


def test_completion_requests_are_keyword_arguments_of_the_openai_client():
    [request] = completion_requests("m", 1, 5, 8, random.Random(0))
    assert "ignore_eos" not in request and request["extra_body"] == {"ignore_eos": True}
    assert (request["model"], request["max_tokens"], request["temperature"], len(request["prompt"])) == ("m", 8, 0, 5)


def test_closed_loop_keeps_order_caps_concurrency_and_times_every_chunk():
    in_flight = peak = 0
    sent = []

    async def handler(request: httpx2.Request) -> httpx2.Response:
        nonlocal in_flight, peak
        sent.append(json.loads(request.content))
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx2.Response(200, content=SSE.encode(), headers={"content-type": "text/event-stream"})

    async def main():
        http = openai.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(handler))
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0) as c:
            return await closed_loop(c, completion_requests("m", 10, 4, 3, random.Random(0)), concurrency=3)

    run = asyncio.run(main())
    assert peak == 3 and len(run.results) == 10 and all(r.ok for r in run.results)
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    assert sent[0]["ignore_eos"] is True  # extra_body reaches the server as a field of its own
    first = run.results[0]
    assert first.text == " Hello!" and first.output_tokens == 3 and first.prompt_tokens == 7
    assert len(first.chunk_times) == 3 and first.ttft_content == first.ttft
    assert summarize_run(run).itl.n == 20  # 2 gaps per request, pooled


def test_a_result_passed_in_fills_while_the_stream_runs():
    from streaming_tutorial.client.latency import RequestResult

    async def main():
        http = openai.DefaultAsyncHttpxClient(transport=httpx2.MockTransport(
            lambda request: httpx2.Response(200, content=SSE.encode(), headers={"content-type": "text/event-stream"})))
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0) as c:
            watched = RequestResult()
            returned = await stream_and_time(c, {"model": "m", "prompt": "Hi", "max_tokens": 3}, watched)
            return watched, returned

    watched, returned = asyncio.run(main())
    assert watched is returned and watched.start > 0 and len(watched.chunk_times) == 3


def metrics_text(cached: float, itl_count: float, itl_sum: float) -> str:
    return (f"vllm:prompt_tokens_cached_total{{engine=\"0\"}} {cached}\n"
            f"vllm:inter_token_latency_seconds_count{{engine=\"0\"}} {itl_count}\n"
            f"vllm:inter_token_latency_seconds_sum{{engine=\"0\"}} {itl_sum}\n")


def test_timed_stream_and_the_prefix_cache_trial_read_metrics_around_their_requests():
    readings = iter([metrics_text(0, 0, 0), metrics_text(0, 2, 0.04),  # timed_stream: before, after
                     metrics_text(10, 0, 0), metrics_text(10, 0, 0),  # prefix trial, first request
                     metrics_text(10, 0, 0), metrics_text(138, 0, 0)])  # second request: 128 from the cache
    chat = "".join(f"data: {json.dumps(e)}\n\n" for e in [
        {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 400, "completion_tokens": 2, "total_tokens": 402}}]) + "data: [DONE]\n\n"

    def handler(stack):  # httpx for /metrics, httpx2 inside the openai client
        def respond(request):
            if request.url.path == "/metrics":
                return stack.Response(200, text=next(readings))
            body = chat if request.url.path.endswith("chat/completions") else SSE
            return stack.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})
        return stack.MockTransport(respond)

    with httpx.Client(transport=handler(httpx), base_url="http://test") as http, \
            openai.OpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                          http_client=openai.DefaultHttpxClient(transport=handler(httpx2))) as client:
        timed = timed_stream(client, http, {"model": "m", "prompt": "Hi", "max_tokens": 3})
        trial = prefix_cache_trial(client, http, "m", "You are a shop.")
    assert timed.result.output_tokens == 3 and len(timed.result.chunk_times) == 3
    assert timed.server_itl == pytest.approx(0.02)
    assert trial.prompt_tokens == 400 and trial.cached_tokens == 128
    assert trial.first_ttft > 0 and trial.second_ttft > 0
