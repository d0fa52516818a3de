"""What is in flight on a shared server, per API key name, and the engine's queue: what admission decides on.

- `Flight`: one inference request between the checks and its last byte; `Traffic`: all of them, by key name, with
  the engine's queue read from vLLM's own gauges, and the rule for a full queue (`Traffic.full`).
- `count_engine_tokens`: wraps the engine client so that each request's prompt and generated tokens are counted,
  also for a stream that ends early.
- `counters()`: per key name (never the key), Prometheus counters in the registry vLLM's /metrics serves.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

from streaming_tutorial.server.keys import Key
from streaming_tutorial.server.request_checks import (
    Limits,
)

# /health says "unhealthy" when the engine has requests but produced no output for this long (a hung engine looks
# alive to vLLM's check_health). A 4096-token prefill takes seconds on 2 cores, far below this.
STALL_SECONDS = 60.0
ANONYMOUS = "anonymous"  # the key label of requests on a server without keys
UNKNOWN = "unknown"  # the key label of a request refused with 401 (its key is no key of ours)


# ---- per-key metrics, in the registry vLLM's /metrics serves ----

_COUNTERS: dict[str, Any] = {}


def counters() -> dict[str, Any]:
    """Created once per process (in-process tests build several apps), in prometheus_client's default registry,
    which vLLM's /metrics serves with one API server process (vLLM uses a multiprocess registry only when it runs
    several API server processes; prometheus_client then writes these counters to that directory too)."""
    if not _COUNTERS:
        from prometheus_client import Counter, Gauge
        _COUNTERS.update(
            requests=Counter("tutorial:requests", "Inference requests accepted, per API key name.", ["key"]),
            in_flight=Gauge("tutorial:requests_in_flight", "Inference requests accepted and not yet answered in "
                            "full, per API key name.", ["key"], multiprocess_mode="livesum"),
            prompt_tokens=Counter("tutorial:prompt_tokens", "Prompt tokens of accepted requests, per API key "
                                  "name.", ["key"]),
            generation_tokens=Counter("tutorial:generation_tokens", "Tokens generated for accepted requests "
                                      "(also those ended early), per API key name.", ["key"]),
            rejections=Counter("tutorial:rejections", "Requests refused, per API key name and reason: limit "
                               "(400), concurrency (429), queue (503), unauthorized (401, key=\"unknown\"), "
                               "revoked (in flight when its key was removed).", ["key", "reason"]),
        )
    return _COUNTERS


def count_unauthorized(scope: Scope) -> None:
    counters()["rejections"].labels(key=UNKNOWN, reason="unauthorized").inc()


# ---- what is in flight, and the engine's queue ----

@dataclass(eq=False)
class Flight:
    """One inference request between our checks and its last byte."""
    key: Key | None
    name: str
    route: str
    sequences: int
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    task: asyncio.Task | None = None
    revoked: bool = False


CURRENT: contextvars.ContextVar[Flight | None] = contextvars.ContextVar("tutorial_flight", default=None)


def engine_gauge(name: str) -> float:
    """The current value of one of vLLM's Prometheus gauges in this process (0 when absent)."""
    from prometheus_client import REGISTRY
    collector = getattr(REGISTRY, "_names_to_collectors", {}).get(name)
    if collector is None:
        return 0.0
    return sum(s.value for family in collector.collect() for s in family.samples if s.name == name)


class Traffic:
    """Requests in flight (per key name) and the engine's queue as this server sees it."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.flights: dict[str, set[Flight]] = {}
        self.sequences = 0  # engine sequences the requests in flight started (n × prompts each)
        self.engine_requests = 0  # calls into the engine's generate() still running
        self.last_progress = time.monotonic()
        self.max_num_seqs: int | None = None  # vLLM's batch size (set once the app state exists)

    def in_flight(self, name: str) -> int:
        return len(self.flights.get(name, ()))

    def add(self, flight: Flight) -> None:
        self.flights.setdefault(flight.name, set()).add(flight)
        self.sequences += flight.sequences
        counters()["in_flight"].labels(key=flight.name).inc()

    def remove(self, flight: Flight) -> None:
        group = self.flights.get(flight.name)
        if group is not None and flight in group:
            group.discard(flight)
            self.sequences -= flight.sequences
            counters()["in_flight"].labels(key=flight.name).dec()
            if not group:
                del self.flights[flight.name]

    def queue(self) -> dict:
        """Waiting and running sequences: vLLM's own gauges (updated each engine step), bounded by what this
        server has in flight (a gauge is stale once the engine idles), and at least what does not fit in vLLM's
        batch (max_num_seqs), which counts a burst at once, before the engine's next step reports it."""
        inflight = self.sequences
        waiting = min(engine_gauge("vllm:num_requests_waiting"), inflight)
        if self.max_num_seqs:
            waiting = max(waiting, inflight - self.max_num_seqs)
        waiting = int(waiting)
        return {"waiting": waiting, "running": max(0, inflight - waiting), "max_waiting": self.limits.max_waiting}

    def full(self, queue: dict | None = None) -> bool:
        """The queue is full when at least `max_waiting` sequences wait and at least as many as run.

        A request that joins such a queue waits for about one whole generation of every running request
        (vLLM serves waiting requests first come, first served, as running ones finish): minutes on a CPU.
        Bound 64: vLLM's CPU batch is 128 sequences (GPU 256-1024), so nothing waits until the batch or the KV
        cache is full; a learner's local server (no keys) running the tests' 64 concurrent streams never
        reaches it (64 in flight leave at most 63 waiting)."""
        q = queue or self.queue()
        bound = self.limits.max_waiting
        return bool(bound) and q["waiting"] >= max(bound, q["running"])

    def stalled(self) -> bool:
        return self.engine_requests > 0 and time.monotonic() - self.last_progress > STALL_SECONDS

    def revoke(self, gone: set[tuple[str, bytes]]) -> None:
        """End the requests in flight made with a key that was removed or changed."""
        for name, key_digest in gone:
            for flight in list(self.flights.get(name, ())):
                if flight.key is not None and flight.key.digest == key_digest and not flight.revoked:
                    flight.revoked = True
                    if flight.task is not None:
                        flight.task.cancel()


def count_engine_tokens(engine_client, traffic: Traffic) -> None:
    """Wrap the engine client's `generate()` (every inference route calls it) to count each request's prompt
    and generated tokens into its Flight (found through a context variable: vLLM's handlers run in tasks that
    inherit the request's context). Exact for streams without a usage chunk and for requests ended early."""
    from vllm.sampling_params import RequestOutputKind

    from streaming_tutorial.server import seam

    if getattr(engine_client, "_tutorial_counted", False) or not seam.on("token-counting"):
        return
    original = engine_client.generate

    async def generate(prompt, sampling_params, request_id, *args, **kwargs):
        flight = CURRENT.get()
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        seen: dict[int, int] = {}
        prompt_counted = False
        traffic.engine_requests += 1
        if traffic.engine_requests == 1:
            traffic.last_progress = time.monotonic()
        outputs = original(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            async for out in outputs:
                traffic.last_progress = time.monotonic()
                if flight is not None:
                    if not prompt_counted and out.prompt_token_ids is not None:
                        flight.prompt_tokens += len(out.prompt_token_ids)
                        prompt_counted = True
                    for o in out.outputs:
                        size = len(o.token_ids)
                        flight.generation_tokens += size if delta else size - seen.get(o.index, 0)
                        seen[o.index] = size if not delta else seen.get(o.index, 0) + size
                yield out
        finally:
            traffic.engine_requests -= 1
            await outputs.aclose()  # at once: vLLM aborts the engine request when its generator closes early

    engine_client.generate = generate
    engine_client._tutorial_counted = True
