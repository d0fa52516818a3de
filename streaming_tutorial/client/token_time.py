"""The measurements behind notebook 08 ("why each token takes as long as it does"): who else is using the
server, and the measurement loops (one stream, a throughput level, TTFT against prompt length, the prefix cache,
one step's anatomy). What bounds the rate is in client/bound.py. Notebook 08 shows `timed_stream`,
`throughput_level` and `prefix_cache_trial` in its cells (`#@save`), character for character
(tests/test_shown_code.py keeps them the same).

    with OtherRequests(url, own=1) as others:              # vllm:num_requests_running + waiting, minus ours
        ...measure...
    print(others.note())                                   # says when the measured rate is a share
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from openai import AsyncOpenAI, OpenAI

from streaming_tutorial.client.latency import RequestResult, measure_stream, random_token_bodies, summarize_run
from streaming_tutorial.client.metrics import metric
from streaming_tutorial.client.streams import closed_loop, completion_requests

# A request's body leaves these out to get the server's defaults (the model's generation config).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")




# --- who else is on the server ------------------------------------------------------------------------------

def requests_on_server(text: str) -> float:
    """Requests the engine is running or has waiting, from /metrics text."""
    return metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")


class OtherRequests:
    """Watch a server's /metrics in a thread while a measurement runs: how many requests besides our `own`
    were running or waiting (vLLM counts every client's). Use as a context manager; `own` may change."""

    def __init__(self, url: str, headers: dict | None = None, own: int = 0, every: float = 0.25) -> None:
        self.url, self.headers, self.own, self.every = url.rstrip("/"), headers or {}, own, every
        self.counts: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="other-requests")

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=10) as client:
            while True:
                try:
                    self.counts.append(max(0.0, requests_on_server(client.get("/metrics").text) - self.own))
                except httpx.HTTPError:
                    pass
                if self._stop.wait(self.every):
                    return

    def __enter__(self) -> OtherRequests:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def median(self) -> float:
        return statistics.median(self.counts) if self.counts else 0.0

    @property
    def shared(self) -> bool:
        return self.median >= 1

    def note(self, what: str = "the measured rate") -> str:
        if not self.shared:
            return f"no other requests on the server while measuring ({len(self.counts)} looks at /metrics)"
        return (f"NOTE: about {self.median:.0f} other requests (median; up to {max(self.counts):.0f}) ran beside "
                f"ours, so {what} is a share of the server, not what it gives one client alone")


# --- measurement loops --------------------------------------------------------------------------------------

def server_defaults(body: dict) -> dict:
    """The request with its sampling parameters left out: the server's defaults apply."""
    return {k: v for k, v in body.items() if k not in SAMPLING_KEYS}


@dataclass
class Timed:
    """One streamed request, and the server's own mean time between tokens over the same window (vLLM's
    `vllm:inter_token_latency_seconds`, from engine timestamps: every request's tokens in that window)."""

    result: RequestResult
    server_itl: float | None


def server_itl_window(before: str, after: str) -> float | None:
    """Mean of vLLM's inter-token latency histogram between two /metrics readings."""
    name = "vllm:inter_token_latency_seconds"
    count = metric(after, name + "_count") - metric(before, name + "_count")
    total = metric(after, name + "_sum") - metric(before, name + "_sum")
    return total / count if count > 0 else None


def timed_stream(client: OpenAI, http: httpx.Client, request: dict) -> Timed:
    """One streamed completion, each chunk timed, between two readings of the server's /metrics."""
    before = http.get("/metrics").text
    result = RequestResult(start=time.perf_counter())
    for chunk in client.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:  # a token; the last chunk, with the usage, has no choices
            result.chunk_times.append(time.perf_counter() - result.start)
        if chunk.usage:
            result.output_tokens = chunk.usage.completion_tokens
    return Timed(result, server_itl_window(before, http.get("/metrics").text))


def one_stream(client: OpenAI, http: httpx.Client, model: str, requests: int, output_len: int, rng: random.Random,
               input_len: int = 16, modes: Sequence[str] = ("greedy",)) -> dict[str, list[Timed]]:
    """`requests` one-at-a-time requests per sampling mode ("greedy", or "server defaults"), the modes
    alternated (each round in a new order) so that a slower minute of the machine hits both alike. One
    untimed warm-up request first. Each: new random prompt, exactly `output_len` tokens (`ignore_eos`)."""
    bodies = completion_requests(model, 1 + requests * len(modes), input_len, output_len, rng)
    timed_stream(client, http, bodies.pop())
    found: dict[str, list[Timed]] = {mode: [] for mode in modes}
    for round_ in range(requests):
        for mode in (modes if round_ % 2 == 0 else list(reversed(modes))):
            body = bodies.pop()
            timed = timed_stream(client, http, body if mode == "greedy" else server_defaults(body))
            if not timed.result.ok:
                raise RuntimeError(f"{mode} request failed: {timed.result.error}")
            found[mode].append(timed)
    return found


@dataclass
class Level:
    """All streams together at one concurrency level."""

    streams: int
    tokens_per_s: float
    tpot: float  # median, seconds
    others: float  # median number of other clients' requests on the server meanwhile
    server_tokens_per_s: float = math.nan  # every client's tokens (vllm:generation_tokens_total) per second
    failed: int = 0

    @property
    def batch(self) -> float:
        """Requests the server ran at once: ours and the others'."""
        return self.streams + self.others


async def throughput_level(client: AsyncOpenAI, http: httpx.Client, requests: list[dict], streams: int) -> Level:
    """The requests, `streams` at a time (notebook 05's closed loop): our streams' tokens/s together, the other
    clients' requests meanwhile, and the whole server's tokens/s (vLLM's count of generated tokens)."""
    generated = metric(http.get("/metrics").text, "vllm:generation_tokens_total")
    with OtherRequests(str(http.base_url), http.headers, own=streams) as others:
        summary = summarize_run(await closed_loop(client, requests, streams))
    generated = metric(http.get("/metrics").text, "vllm:generation_tokens_total") - generated
    return Level(streams, summary.output_throughput, summary.tpot.median, others.median,
                 generated / summary.duration, summary.failed)


def ttft_by_prompt_length(http: httpx.Client, model: str, lengths: Sequence[int], rng: random.Random,
                          repeats: int = 2) -> dict[int, float]:
    """Median TTFT (seconds) of `repeats` requests per prompt length, each a new prompt of random token ids
    (the prefix cache cannot help) and 2 output tokens."""
    found = {}
    for length in lengths:
        times = []
        for body in random_token_bodies(model, repeats, length, 2, rng):
            result = measure_stream(http, "/v1/completions", body)
            if not result.ok:
                raise RuntimeError(f"prompt of {length} tokens failed: {result.error}")
            times.append(result.ttft)
        found[length] = statistics.median(times)
    return found


WORDS = ("river", "lamp", "orbit", "maple", "signal", "copper", "harbor", "violet", "engine", "meadow", "pixel",
         "canyon", "ledger", "falcon", "quartz", "tundra", "ember", "glacier", "saddle", "beacon")


def system_prompt(rng: random.Random, rules: int) -> str:
    """A long system prompt of numbered house rules made of random words: no other client shares it."""
    return "You answer questions for a shop. House rules:\n" + "\n".join(
        f"{i}. " + " ".join(rng.choice(WORDS) for _ in range(12)) + "." for i in range(1, rules + 1))


@dataclass
class PrefixTrial:
    prompt_tokens: int
    first_ttft: float  # seconds; the system prompt is new
    second_ttft: float  # the same system prompt, another question
    cached_tokens: float  # vllm:prompt_tokens_cached_total's growth over the second request


def prefix_cache_trial(client: OpenAI, http: httpx.Client, model: str, system: str) -> PrefixTrial:
    """Two questions after the same long system prompt: each one's TTFT, and the prompt tokens the second
    took from the prefix cache (vLLM's counter on /metrics)."""
    ttft = []
    for question in ("What are your opening hours?", "Do you deliver on Sundays?"):
        cached = metric(http.get("/metrics").text, "vllm:prompt_tokens_cached_total")
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model=model, max_tokens=2, temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        first = None
        for chunk in stream:
            if chunk.choices and first is None:
                first = time.perf_counter() - start  # vLLM's TTFT: the first chunk with choices
            if chunk.usage:
                prompt_tokens = chunk.usage.prompt_tokens
        ttft.append(first)
        cached = metric(http.get("/metrics").text, "vllm:prompt_tokens_cached_total") - cached
    return PrefixTrial(prompt_tokens, ttft[0], ttft[1], cached)


@dataclass
class Anatomy:
    """One decode step of one stream, in seconds per token, split as a client can split it."""

    measured: float  # client's median time per output token, greedy
    weights: float  # the bandwidth bound: the weights' bytes / read bandwidth
    output_path: float  # client's time per token minus the server's own (engine timestamps)
    sampler: float  # server defaults' time per token minus greedy's
    parts: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, measured: dict[str, list[Timed]], weights: float) -> Anatomy:
        def median_tpot(mode: str) -> float:
            return statistics.median(t.result.tpot for t in measured[mode])

        greedy = median_tpot("greedy")
        server = statistics.median(t.server_itl for t in measured["greedy"] if t.server_itl)
        sampler = median_tpot("server defaults") - greedy if "server defaults" in measured else 0.0
        anatomy = cls(greedy, weights, greedy - server, sampler)
        reading = min(weights, server)
        anatomy.parts = {"reading the weights (bound)": reading,
                         "rest of the step (scheduler, Python, kernel launches, compute)": server - reading,
                         "output path (server to client)": max(0.0, greedy - server),
                         "sampler (temperature, top-p, repetition penalty)": max(0.0, sampler)}
        return anatomy
