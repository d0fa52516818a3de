"""streaming_tutorial.client.latency: the arithmetic on recorded streams (fast, no server), then real requests."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from streaming_tutorial.client.latency import (
    RequestResult,
    RunResult,
    Stats,
    bench_args_with_key,
    consume,
    measure_stream,
    run_concurrent,
    summarize_run,
    vllm_bench_argv,
)


def frame(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def chat_chunk(content=None, role=None, finish=None) -> dict:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def completion_chunk(text, finish=None) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}
# A chat stream as vLLM 0.32 sends it: role-only chunk, deltas (one carrying two tokens), usage, [DONE].
CHAT_EVENTS = [chat_chunk("", role="assistant"), chat_chunk("Hel"), chat_chunk("lo"), chat_chunk(" wor ld"),
               chat_chunk("!", finish="stop"), USAGE, "[DONE]"]
CHAT_SSE = "".join(frame(e) for e in CHAT_EVENTS)


class FakeClock:
    """Each reading advances by the next of `steps` (the times at which the events 'arrive')."""

    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_chat_stream_metrics_follow_vllm_definitions():
    # Arrivals: role chunk at 0.10, content at 0.11, 0.20, 0.30, 0.45; usage at 0.46; [DONE] at 0.47.
    clock = FakeClock([0.10, 0.11, 0.20, 0.30, 0.45, 0.46, 0.47])
    result = consume(CHAT_SSE.splitlines(), 0.0, RequestResult(), clock)
    assert result.ok
    assert result.ttft == pytest.approx(0.10)  # vLLM: the role-only chunk counts
    assert result.ttft_content == pytest.approx(0.11)  # reader-perceived: first non-empty content
    assert result.itl == pytest.approx([0.01, 0.09, 0.10, 0.15])  # per chunk, not per token
    assert result.e2e == pytest.approx(0.45)  # the usage chunk at 0.46 is excluded
    assert result.output_tokens == 5 and result.prompt_tokens == 7  # from usage, not from 5 chunks
    assert result.tpot == pytest.approx((0.45 - 0.10) / 4)
    assert result.tokens_per_s == pytest.approx(5 / 0.45)
    assert result.text == "Hello wor ld!"
    assert result.finish_reason == "stop"


def test_completion_stream_has_no_role_chunk_so_both_ttfts_agree():
    events = [completion_chunk("The"), completion_chunk(""), completion_chunk(" sky", finish="length"), USAGE,
              "[DONE]"]
    clock = FakeClock([0.2, 0.25, 0.3, 0.31, 0.32])
    result = consume("".join(frame(e) for e in events).splitlines(), 0.0, RequestResult(), clock)
    assert result.ttft == result.ttft_content == pytest.approx(0.2)
    # An empty-text chunk (a token the detokenizer holds back) is still a message: it adds an ITL gap.
    assert result.itl == pytest.approx([0.05, 0.05])
    assert result.finish_reason == "length"


def test_error_after_200_and_missing_usage():
    events = [chat_chunk("", role="assistant"), {"error": {"message": "boom", "type": "InternalServerError"}},
              "[DONE]"]
    result = consume("".join(frame(e) for e in events).splitlines(), 0.0, RequestResult(), FakeClock([1, 2, 3]))
    assert result.error == "boom" and not result.ok
    assert result.tpot is None and result.output_tokens is None


def test_stream_ends_at_done_and_skips_comments():
    text = ": keep-alive\n\n" + frame(completion_chunk("a")) + frame("[DONE]") + frame(completion_chunk("late"))
    result = consume(text.splitlines(), 0.0, RequestResult(), FakeClock([1, 2, 3]))
    assert result.text == "a"


def mock_transport(status=200, body=CHAT_SSE):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(status, content=body.encode(), headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler), seen


def test_measure_stream_asks_for_streaming_and_usage():
    transport, seen = mock_transport()
    with httpx.Client(transport=transport, base_url="http://test") as client:
        result = measure_stream(client, "/v1/chat/completions", {"model": "m", "messages": []})
    assert seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}
    assert result.ok and result.output_tokens == 5 and len(result.chunk_times) == 5
    assert all(b >= a for a, b in zip(result.chunk_times, result.chunk_times[1:]))


def test_measure_stream_reports_http_errors():
    transport, _ = mock_transport(404, '{"error": {"message": "The model `x` does not exist."}}')
    with httpx.Client(transport=transport, base_url="http://test") as client:
        result = measure_stream(client, "/v1/chat/completions", {"model": "x", "messages": []})
    assert not result.ok and result.error.startswith("HTTP 404") and "does not exist" in result.error


def test_run_concurrent_keeps_order_and_caps_concurrency():
    in_flight = peak = 0

    async def handler(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, content=CHAT_SSE.encode())

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test") as client:
            return await run_concurrent(client, "/v1/chat/completions", [{"i": i} for i in range(10)], 3)
    run = asyncio.run(main())
    assert peak == 3 and len(run.results) == 10 and all(r.ok for r in run.results)
    summary = summarize_run(run)
    assert summary.completed == 10 and summary.output_tokens == 50
    assert summary.itl.n == 40  # pooled over requests: 4 gaps each
    assert summary.output_throughput == pytest.approx(50 / run.duration)


def test_client_side_cost_per_chunk_is_below_a_tenth_of_a_millisecond():
    chunk = frame(chat_chunk(" token")).splitlines()
    lines = chunk * 20_000
    started = time.perf_counter()
    result = consume(lines, started, RequestResult())
    per_chunk = (time.perf_counter() - started) / 20_000
    assert len(result.chunk_times) == 20_000
    assert per_chunk < 1e-4, f"{per_chunk * 1e6:.1f} us per chunk"


def test_stats_match_numpy():
    values = [0.3, 0.1, 0.25, 0.9, 0.4, 0.12, 0.5]
    stats = Stats.of(values)
    assert stats.median == pytest.approx(np.median(values))
    assert stats.p90 == pytest.approx(np.percentile(values, 90))
    assert stats.p99 == pytest.approx(np.percentile(values, 99))
    assert stats.mean == pytest.approx(np.mean(values))
    assert math.isnan(Stats.of([]).median)


def test_vllm_bench_argv_parses_with_vllms_own_parser():
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args(vllm_bench_argv("http://127.0.0.1:1", input_len=40, output_len=16, max_concurrency=4))
    assert (args.random_input_len, args.random_output_len, args.max_concurrency) == (40, 16, 4)
    assert args.endpoint == "/v1/completions" and args.backend == "openai" and args.temperature == 0
    with_key = parser.parse_args(bench_args_with_key(vllm_bench_argv("http://127.0.0.1:1"), "secret"))
    assert with_key.header == ["Authorization=Bearer secret"]


# --- against the real session server ----------------------------------------------------------------------

def test_real_chat_stream_is_measured(http, model_name):
    body = {"model": model_name, "messages": [{"role": "user", "content": "Count from one to five."}],
            "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    result = measure_stream(http, "/v1/chat/completions", body)
    assert result.ok, result.error
    assert result.output_tokens == 12
    assert 0 < result.ttft <= result.ttft_content <= result.e2e
    assert len(result.itl) == len(result.chunk_times) - 1 >= 1
    assert result.tpot > 0 and result.finish_reason == "length"


def test_real_concurrent_run(server, model_name):
    bodies = [{"model": model_name, "prompt": f"Fact number {i} about the sea:", "max_tokens": 8,
               "ignore_eos": True, "temperature": 0} for i in range(4)]

    async def main() -> RunResult:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            return await run_concurrent(client, "/v1/completions", bodies, concurrency=2)
    summary = summarize_run(asyncio.run(main()))
    assert summary.completed == 4 and summary.failed == 0
    assert summary.output_tokens == 32
    assert summary.ttft.n == 4 and summary.itl.n >= 4


# ---- make bench's ratio statistics (streaming_tutorial.client.benchmark) ----

def test_the_bench_interval_holds_the_median_and_narrows_with_more_rounds():
    from streaming_tutorial.client.benchmark import median_interval

    rng = np.random.default_rng(1)
    few, many = rng.normal(1.0, 0.05, 6), rng.normal(1.0, 0.05, 60)
    for values in (few, many):
        median, low, high = median_interval(list(values))
        assert low <= median <= high and median == pytest.approx(float(np.median(values)))
    def width(values) -> float:
        _, low, high = median_interval(list(values))
        return high - low

    assert width(many) < width(few)
    assert median_interval([0.97] * 5) == (0.97, 0.97, 0.97)  # no spread, no interval


def test_the_servers_own_time_between_tokens_is_read_from_two_metrics_snapshots():
    from streaming_tutorial.client.benchmark import server_itl

    def text(total: float, count: int) -> str:
        return ("# TYPE vllm:inter_token_latency_seconds histogram\n"
                f'vllm:inter_token_latency_seconds_sum{{model_name="m"}} {total}\n'
                f'vllm:inter_token_latency_seconds_count{{model_name="m"}} {count}\n')

    assert server_itl(text(1.0, 40), text(3.5, 140)) == pytest.approx(0.025)
    assert math.isnan(server_itl(text(1.0, 40), text(1.0, 40)))


def test_vllms_benchmark_client_imports_without_a_word_on_stderr():
    """Notebook 04 runs vLLM's benchmark client in its kernel: anything on stderr is a red box in JupyterLab."""
    done = subprocess.run([sys.executable, "-c", "from streaming_tutorial.client.latency import vllm_bench_module\n"
                           "vllm_bench_module()"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Triton" not in done.stderr and "IProgress" not in done.stderr, done.stderr
