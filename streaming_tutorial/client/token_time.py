"""The measurements behind notebook 08 ("why each token takes as long as it does"), kept out of the lesson:
who else is using the server, and the measurement loops (one stream, a throughput curve, TTFT against prompt
length, the prefix cache, one step's anatomy). What bounds the rate is in client/bound.py.

    with OtherRequests(url, own=1) as others:              # vllm:num_requests_running + waiting, minus ours
        ...measure...
    print(others.note())                                   # says when the measured rate is a share
"""

from __future__ import annotations

import math
import random
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from streaming_tutorial.client.latency import (
    RequestResult,
    async_client,
    measure_stream,
    random_token_bodies,
    run_concurrent,
    summarize_run,
)
from streaming_tutorial.client.metrics import metric

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


def timed_stream(http: httpx.Client, body: dict) -> Timed:
    """One streamed /v1/completions request, between two readings of /metrics."""
    before = http.get("/metrics").text
    result = measure_stream(http, "/v1/completions", body)
    return Timed(result, server_itl_window(before, http.get("/metrics").text))


def one_stream(http: httpx.Client, model: str, requests: int, output_len: int, rng: random.Random,
               input_len: int = 16, modes: Sequence[str] = ("greedy",)) -> dict[str, list[Timed]]:
    """`requests` one-at-a-time requests per sampling mode ("greedy", or "server defaults"), the modes
    alternated (each round in a new order) so that a slower minute of the machine hits both alike. One
    untimed warm-up request first. Each: new random prompt, exactly `output_len` tokens (`ignore_eos`)."""
    bodies = random_token_bodies(model, 1 + requests * len(modes), input_len, output_len, rng)
    timed_stream(http, bodies.pop())
    found: dict[str, list[Timed]] = {mode: [] for mode in modes}
    for round_ in range(requests):
        for mode in (modes if round_ % 2 == 0 else list(reversed(modes))):
            body = bodies.pop()
            timed = timed_stream(http, body if mode == "greedy" else server_defaults(body))
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


async def throughput_curve(url: str, api_key: str | None, model: str, levels: Sequence[int], output_len: int,
                           rng: random.Random, input_len: int = 16, rounds: int = 2,
                           headers: dict | None = None) -> list[Level]:
    """At each level C, `rounds × C` requests with C in flight (a closed loop, as notebook 05), greedy; the
    aggregate output tokens/s and how many other requests shared the server meanwhile."""
    found = []
    async with async_client(url, api_key, concurrency=max(levels)) as client:
        await run_concurrent(client, "/v1/completions", random_token_bodies(model, 2, input_len, 8, rng), 2)
        for c in levels:
            bodies = random_token_bodies(model, rounds * c, input_len, output_len, rng)
            before = (await client.get("/metrics")).text
            with OtherRequests(url, headers, own=c) as others:
                summary = summarize_run(await run_concurrent(client, "/v1/completions", bodies, c))
            after = (await client.get("/metrics")).text
            generated = metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
            found.append(Level(c, summary.output_throughput, summary.tpot.median, others.median,
                               generated / summary.duration, summary.failed))
    return found


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


def prefix_cache_trial(http: httpx.Client, model: str, rng: random.Random, rules: int = 100) -> PrefixTrial:
    """TTFT of a chat with a new long system prompt, then of another question with the same system prompt."""
    system = system_prompt(rng, rules)
    ttft, cached = [], 0.0
    for question in ("What are your opening hours?", "Do you deliver on Sundays?"):
        body = {"model": model, "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
        before = http.get("/metrics").text
        result = measure_stream(http, "/v1/chat/completions", body)
        if not result.ok:
            raise RuntimeError(f"prefix-cache request failed: {result.error}")
        after = http.get("/metrics").text
        cached = metric(after, "vllm:prompt_tokens_cached_total") - metric(before, "vllm:prompt_tokens_cached_total")
        ttft.append(result.ttft)
    return PrefixTrial(result.prompt_tokens or 0, ttft[0], ttft[1], cached)


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
