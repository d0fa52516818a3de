"""Shared-server limits of `streaming_server.py`: one student cannot stall a workshop (issue 11).

vLLM 0.32 has no per-client limits: one chat request with `"n": 16000`, or a completion with 1,000 prompts, fills
the engine for minutes while everyone else waits. This module adds, in front of vLLM's app:

1. Per-request limits, checked on the JSON body of every route that runs inference, before anything reaches the
   engine; over a limit the answer is a 400 in vLLM's error shape naming the parameter and the limit:
   sequences per request (`n`, `best_of`, and n × prompts), output tokens (`max_tokens`, `max_completion_tokens`,
   `max_output_tokens`; also the default when a request gives none, through vLLM's own generation-config
   mechanism), prompts per request (a list `prompt`, a batch of conversations, scoring `items`), and logprobs
   (`logprobs`, `top_logprobs`, `prompt_logprobs`, `label_token_ids`) within vLLM's `--max-logprobs`.
2. Per-key concurrency: at most K requests in flight per API key (a keys file may give a key its own K); more
   get a 429 with Retry-After. Requests made with a key that is removed from the keys file end: a stream gets a
   last `data: {"error": ...}` then `data: [DONE]`, and its engine request is aborted.
3. Bounded waiting: when the engine's queue is full (see `QueueState.full`), new requests get a 503 with
   Retry-After at once, and /health says "overloaded" (503) instead of "healthy".
4. Per key name (never the key): Prometheus counters in vLLM's /metrics (`tutorial:requests_total`,
   `tutorial:prompt_tokens_total`, `tutorial:generation_tokens_total`, `tutorial:rejections_total{reason}`), and
   one log line per finished request.

Every flag has an environment variable (for `make serve`); 0 turns a limit off.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streaming_tutorial.keys import KEYS_FILE_ENV, POLL_SECONDS, Key, KeyRing
from streaming_tutorial.security import error_body, is_open_route, send_error

logger = logging.getLogger("vllm.streaming_tutorial.limits")  # under "vllm": vLLM's log format and handler

# ---- the flags ----

# (flag, environment variable, default, help). The defaults suit a shared workshop server on the bundled model
# and leave every existing test and notebook unchanged (none asks for more).
FLAGS = {
    # n > 1 multiplies the work of a request (vLLM accepts n up to 16384, each a sequence of its own).
    "max_seqs_per_request": ("--max-seqs-per-request", "TUTORIAL_MAX_SEQS_PER_REQUEST", 4,
                             "Most sequences one request may start: n, best_of, and n × prompts."),
    # A cap, not the default: vLLM's default for a request without one is min(the model's generation-config
    # default, this cap). On a small CPU, 1024 tokens is most of a minute of one stream.
    "max_output_tokens": ("--max-output-tokens", "TUTORIAL_MAX_OUTPUT_TOKENS", 1024,
                          "Most output tokens per request (max_tokens and its aliases), also when a request "
                          "gives none."),
    # vLLM takes up to 1,024 prompts in one /v1/completions request (VLLM_MAX_COMPLETION_PROMPTS).
    "max_prompts_per_request": ("--max-prompts-per-request", "TUTORIAL_MAX_PROMPTS_PER_REQUEST", 4,
                                "Most prompts in one request (a list `prompt`, a batch of conversations, scoring "
                                "items, decision questions)."),
    # A student runs a notebook, perhaps a second one, and the page's 4-lane race: 4 is enough for one person.
    "max_requests_per_key": ("--max-requests-per-key", "TUTORIAL_MAX_REQUESTS_PER_KEY", 4,
                             "Most inference requests in flight per API key (a keys-file line `name:key:N` "
                             "overrides it for that key); more get a 429. No effect without keys."),
    # See QueueState.full for the rule and why 64.
    "max_waiting": ("--max-waiting", "TUTORIAL_MAX_WAITING", 64,
                    "Refuse new requests (503) while the engine's queue holds at least this many waiting "
                    "sequences and at least as many as are running."),
}
RETRY_AFTER_CONCURRENCY_S = 2  # a short answer of the bundled model takes a few seconds
RETRY_AFTER_QUEUE_S = 10
# /health says "unhealthy" when the engine has requests but produced no output for this long (a hung engine looks
# alive to vLLM's check_health). A 4096-token prefill takes seconds on 2 cores, far below this.
STALL_SECONDS = 60.0
ANONYMOUS = "anonymous"  # the key label of requests on a server without keys
UNKNOWN = "unknown"  # the key label of a request refused with 401 (its key is no key of ours)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: {name}={value!r} is not a whole number") from None


def add_limit_args(parser) -> None:
    """Add this server's limit flags (and `--api-keys-file`) to vLLM's parser, defaults from the environment."""
    group = parser.add_argument_group("shared-server limits (streaming_server.py; 0 turns a limit off)")
    for dest, (flag, env, default, help_) in FLAGS.items():
        group.add_argument(flag, dest=dest, type=int, default=env_int(env, default),
                           help=f"{help_} Default: {default}; environment: {env}.")
    group.add_argument("--api-keys-file", dest="api_keys_file", default=os.environ.get(KEYS_FILE_ENV) or None,
                       metavar="PATH",
                       help="A file of API keys, one `name:key` or `name:key:N` per line (N: this key's "
                            "requests in flight); re-read within a second of a change. Adds to --api-key. "
                            f"Environment: {KEYS_FILE_ENV}.")


@dataclass
class Limits:
    max_seqs_per_request: int = 4
    max_output_tokens: int = 1024
    max_prompts_per_request: int = 4
    max_requests_per_key: int = 4
    max_waiting: int = 64
    max_logprobs: int = 20  # vLLM's --max-logprobs; -1 means no limit

    @classmethod
    def from_args(cls, args) -> Limits:
        values = {dest: getattr(args, dest, default) for dest, (_, _, default, _) in FLAGS.items()}
        for dest, value in values.items():
            if value is None or value < 0:
                raise SystemExit(f"error: {FLAGS[dest][0]} must be 0 (off) or more, got {value}")
        return cls(**values, max_logprobs=getattr(args, "max_logprobs", 20))

    def public(self) -> dict:
        """What /health shows."""
        return {"max_seqs_per_request": self.max_seqs_per_request, "max_output_tokens": self.max_output_tokens,
                "max_prompts_per_request": self.max_prompts_per_request,
                "max_requests_per_key": self.max_requests_per_key, "max_waiting": self.max_waiting,
                "max_logprobs": self.max_logprobs}


# ---- which routes run inference ----

# Every POST route of vLLM 0.32 (generate task) that hands work to the engine, with where its size lives. The
# checks below are by field name (the same names mean the same on every route), so a route is covered by being
# listed here or by being unknown: a POST route in neither set is treated as inference (fails closed).
INFERENCE_ROUTES = {
    "/v1/chat/completions": "n, max_tokens/max_completion_tokens, logprobs/top_logprobs/prompt_logprobs",
    "/v1/chat/completions/batch": "messages is a list of conversations (a batch); n must be 1",
    "/v1/completions": "prompt may be a list of prompts (a batch); n, max_tokens, logprobs, prompt_logprobs",
    "/v1/responses": "max_output_tokens, top_logprobs",
    "/v1/messages": "max_tokens (required)",
    "/invocations": "SageMaker: dispatched by the body's shape to chat, completions, ...: the same fields",
    "/inference/v1/generate": "token ids; sampling_params.{n, max_tokens, logprobs, prompt_logprobs}",
    "/generative_scoring": "items (one prompt each, a batch); label_token_ids (logprobs)",
    "/v1/systemone": "structured decisions: one short read per question (a batch)",
}
# POST routes that never reach the engine's queue: tokenizing, rendering, probes, admin, cancellation.
NOT_INFERENCE_ROUTES = {
    "/tokenize", "/detokenize", "/v1/messages/count_tokens", "/ping",
    "/v1/chat/completions/render", "/v1/messages/render", "/v1/completions/render", "/v1/responses/render",
    "/v1/chat/completions/derender", "/v1/completions/derender",
    "/inference/v1/abort_requests", "/scale_elastic_ep", "/is_scaling_elastic_ep",
    # The classroom page's race (streaming_tutorial/page.py) sends each lane through the whole app as its own
    # /v1/chat/completions request, which these checks and the per-key limit then see one by one.
    "/page/race",
}
RESPONSE_CANCEL = re.compile(r"^/v1/responses/[^/]+/cancel$")


def runs_inference(path: str, method: str) -> bool:
    if method != "POST" or path in NOT_INFERENCE_ROUTES or RESPONSE_CANCEL.match(path):
        return False
    return not is_open_route(path, method)


# ---- the per-request checks ----

INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def as_int(value: Any) -> int | None:
    """The integer pydantic (lax mode) would make of `value`, or None when it is not one (vLLM then answers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and INT_TEXT.fullmatch(value):
        return int(value)
    return None


@dataclass
class Violation:
    param: str
    message: str


def prompt_count(path: str, body: dict) -> tuple[str, int]:
    """(the parameter that holds the prompts, how many prompts the request has)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return "prompt", len(prompt)  # a list of strings or of token-id lists (a list of ints is one prompt)
    messages = body.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages):
        return "messages", len(messages)  # /v1/chat/completions/batch: a list of conversations
    if isinstance(body.get("items"), list):
        return "items", len(body["items"])  # /generative_scoring
    if isinstance(body.get("questions"), dict):
        return "questions", len(body["questions"])  # /v1/systemone
    return "prompt", 1


def request_sequences(body: Any) -> int:
    """How many engine sequences a (valid) request starts: n (or best_of) × prompts."""
    if not isinstance(body, dict):
        return 1
    places = [body, body["sampling_params"]] if isinstance(body.get("sampling_params"), dict) else [body]
    n = max([1, *(as_int(p.get(f)) or 1 for p in places for f in ("n", "best_of"))])
    return n * prompt_count("", body)[1]


def check_request(path: str, body: Any, limits: Limits) -> Violation | None:
    """The first limit the request's body is over, or None. Values of the wrong type are left to vLLM."""
    if not isinstance(body, dict):
        return None
    sp = body.get("sampling_params")
    places = [(body, ""), (sp, "sampling_params.")] if isinstance(sp, dict) else [(body, "")]

    seqs = limits.max_seqs_per_request
    n = 1
    for where, prefix in places:
        for name in ("n", "best_of"):
            value = as_int(where.get(name))
            if value is None:
                continue
            n = max(n, value)
            if seqs and value > seqs:
                return Violation(prefix + name, f"`{prefix + name}` = {value} is over this server's limit of "
                                                f"{seqs} sequences per request: ask for at most {seqs}.")
    param, prompts = prompt_count(path, body)
    if limits.max_prompts_per_request and prompts > limits.max_prompts_per_request:
        cap = limits.max_prompts_per_request
        return Violation(param, f"`{param}` holds {prompts} prompts; this server takes at most {cap} per "
                                f"request: send them in several requests.")
    if seqs and n * prompts > seqs:
        return Violation("n", f"n × prompts = {n} × {prompts} = {n * prompts} sequences is over this server's "
                              f"limit of {seqs} sequences per request.")

    cap = limits.max_output_tokens
    if cap:
        for where, prefix in places:
            for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                value = as_int(where.get(name))
                if value is not None and value > cap:
                    return Violation(prefix + name, f"`{prefix + name}` = {value} is over this server's limit "
                                                    f"of {cap} output tokens per request.")

    most = limits.max_logprobs
    if most != -1:
        for where, prefix in places:
            for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
                value = as_int(where.get(name))  # chat's boolean `logprobs` is not a number: skipped
                if value is not None and (value > most or value == -1):
                    asked = "all" if value == -1 else str(value)
                    return Violation(prefix + name, f"`{prefix + name}` = {asked} is over this server's limit "
                                                    f"of {most} logprobs per token (--max-logprobs).")
        labels = body.get("label_token_ids")
        if isinstance(labels, list) and len(labels) > most:
            return Violation("label_token_ids", f"`label_token_ids` has {len(labels)} ids; this server returns "
                                                f"at most {most} logprobs per token (--max-logprobs).")
    return None


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

    if getattr(engine_client, "_tutorial_counted", False):
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


# ---- the middleware ----

# No API request nests JSON more than a few levels (a tool's parameter schema perhaps a dozen).
TOO_DEEP = ("The request body's JSON is nested too deeply (arrays or objects inside each other, hundreds of levels) "
            "for this server to read. No API request needs that: send a flatter body.")


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class LimitsMiddleware:
    """Pure ASGI, inside the key check and the body-size limit: per-request limits (400), per-key concurrency
    (429), the queue bound (503), then runs the request so that it can be ended if its key is removed, and
    counts and logs it when it finishes."""

    def __init__(self, app: ASGIApp, limits: Limits, traffic: Traffic) -> None:
        self.app = app
        self.limits = limits
        self.traffic = traffic

    async def refuse(self, send: Send, name: str, reason: str, status: int, type_: str, message: str,
                     param: str | None = None, retry_after: int | None = None) -> None:
        counters()["rejections"].labels(key=name, reason=reason).inc()
        headers = [(b"retry-after", str(retry_after).encode())] if retry_after else []
        await send_error(send, status, error_body(message, type_, status, param), headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if not runs_inference(path, scope.get("method", "GET")):
            return await self.app(scope, receive, send)
        body_bytes = scope.get("tutorial.body")
        if body_bytes is None:  # without the body-size middleware in front (unit tests): read it here
            body_bytes, receive = await buffer_body(receive)
        key: Key | None = scope.get("tutorial.key")
        name = key.name if key else ANONYMOUS
        try:
            body = json.loads(body_bytes)
        except (ValueError, UnicodeDecodeError):
            return await self.app(scope, receive, send)  # vLLM's own 400, at once
        except RecursionError:  # `[[[[...]]]]`: Python's parser gives up (vLLM's would too, with a 500)
            return await self.refuse(send, name, "limit", 400, "BadRequestError", TOO_DEEP)

        if violation := check_request(path, body, self.limits):
            return await self.refuse(send, name, "limit", 400, "BadRequestError", violation.message,
                                     param=violation.param)
        cap = (key.max_in_flight or self.limits.max_requests_per_key) if key else 0
        if cap and self.traffic.in_flight(name) >= cap:
            return await self.refuse(
                send, name, "concurrency", 429, "RateLimitError",
                f"This key already has {cap} requests in flight (the limit per key). Wait for one to finish; "
                f"retry after {RETRY_AFTER_CONCURRENCY_S} s.", retry_after=RETRY_AFTER_CONCURRENCY_S)
        if self.traffic.max_num_seqs is None and hasattr(scope.get("app"), "state"):
            config = getattr(scope["app"].state, "vllm_config", None)
            self.traffic.max_num_seqs = getattr(getattr(config, "scheduler_config", None), "max_num_seqs", None)
        queue = self.traffic.queue()
        if self.traffic.full(queue):
            return await self.refuse(
                send, name, "queue", 503, "ServiceUnavailableError",
                f"The server is busy: {queue['waiting']} requests are already waiting for the engine. Retry "
                f"after {RETRY_AFTER_QUEUE_S} s.", retry_after=RETRY_AFTER_QUEUE_S)

        flight = Flight(key, name, path, request_sequences(body))
        self.traffic.add(flight)
        counters()["requests"].labels(key=name).inc()
        try:
            status = await self.run(flight, scope, receive, send)
        finally:
            self.traffic.remove(flight)
            counters()["prompt_tokens"].labels(key=name).inc(flight.prompt_tokens)
            counters()["generation_tokens"].labels(key=name).inc(flight.generation_tokens)
        if flight.revoked:
            counters()["rejections"].labels(key=name, reason="revoked").inc()
        logger.info("%s key=%s status=%s prompt_tokens=%d generation_tokens=%d seconds=%.2f%s", path, name,
                    status, flight.prompt_tokens, flight.generation_tokens, time.monotonic() - flight.started,
                    " (ended: key removed)" if flight.revoked else "")

    async def run(self, flight: Flight, scope: Scope, receive: Receive, send: Send) -> int | str:
        """Run vLLM's app for this request in a task of its own, which `Traffic.revoke` cancels when the key is
        removed: then a stream ends with an error event and [DONE] (a request with no answer yet gets a 401).
        Returns the HTTP status sent."""
        state = {"status": None, "sse": False, "done": False}

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                state["sse"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        flight.task = asyncio.ensure_future(self.run_app(flight, scope, receive, watching_send))
        try:
            await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if not flight.revoked or not flight.task.done():
                flight.task.cancel()  # we were cancelled (server shutdown): stop the app too
                raise
        if flight.revoked and not state["done"]:
            message = "This API key was removed from the server; the request was stopped."
            if state["status"] is None:
                await send_error(send, 401, error_body(message, "Unauthorized", 401))
                return 401
            if state["sse"]:
                await send({"type": "http.response.body", "more_body": True,
                            "body": sse_event({"error": {"message": message, "type": "Unauthorized",
                                                         "param": None, "code": 401}}) + b"data: [DONE]\n\n"})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return state["status"] or "none"

    async def run_app(self, flight: Flight, scope: Scope, receive: Receive, send: Send) -> None:
        CURRENT.set(flight)  # this task's context; vLLM's tasks for the request copy it
        await self.app(scope, receive, send)


async def buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
    replay = ([{"type": "http.request", "body": body, "more_body": False}]
              if messages[-1]["type"] == "http.request" else messages[-1:])

    async def replaying_receive() -> Message:
        return replay.pop(0) if replay else await receive()

    return body, replaying_receive


# ---- wiring ----

def cap_default_output_tokens(model_config, cap: int) -> None:
    """Make vLLM's own default `max_tokens` (for a request that gives none) at most `cap`.

    vLLM takes that default from the model's generation config (`max_new_tokens`; the bundled model's is 512),
    with `--override-generation-config` on top, and a `max_new_tokens` set there also clamps every request
    (`override_max_tokens`, on chat, completions, responses, messages through chat, /inference/v1/generate). The
    serving objects read it when they are created, after `create_app`; so where the model's default is above
    the cap (or absent: up to the whole context) we set the override to the cap."""
    if model_config is None or not cap:
        return
    default = model_config.get_diff_sampling_param().get("max_tokens")
    if default is None or default > cap:
        model_config.override_generation_config = {**model_config.override_generation_config,
                                                   "max_new_tokens": cap}


def install_limits(app, args, model_config=None, keyring: KeyRing | None = None) -> None:
    """Add the limits middleware, the per-key counters and the keys-file watcher to vLLM's app."""
    limits = Limits.from_args(args)
    traffic = Traffic(limits)
    app.state.tutorial_limits = limits
    app.state.tutorial_traffic = traffic
    app.state.tutorial_keyring = keyring
    counters()
    cap_default_output_tokens(model_config, limits.max_output_tokens)
    if keyring is not None:
        keyring.on_change(traffic.revoke)
    app.user_middleware.insert(0, Middleware(LimitsMiddleware, limits=limits, traffic=traffic))

    vllm_lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with vllm_lifespan(app):
            watch_engine(app)
            watcher = asyncio.ensure_future(watch_keys(keyring)) if keyring is not None and keyring.path else None
            try:
                yield
            finally:
                if watcher is not None:
                    watcher.cancel()

    app.router.lifespan_context = lifespan


def watch_engine(app) -> None:
    """Count the tokens of the app's engine client and read its batch size. Called when the app starts serving,
    and again for each new engine after an engine restart (streaming_tutorial/engine_restart.py)."""
    traffic: Traffic = app.state.tutorial_traffic
    engine_client = getattr(app.state, "engine_client", None)
    if engine_client is not None:
        count_engine_tokens(engine_client, traffic)
    config = getattr(app.state, "vllm_config", None)
    traffic.max_num_seqs = getattr(getattr(config, "scheduler_config", None), "max_num_seqs", None)


async def watch_keys(keyring: KeyRing) -> None:
    """Look at the keys file about once a second, so a removed key's streams end without waiting for a request."""
    while True:
        await asyncio.sleep(POLL_SECONDS)
        try:
            keyring.refresh()
        except Exception:  # never let the watcher die; the next request's refresh tries again
            logger.exception("Checking the keys file failed")


def limits_health(app) -> dict:
    """Fields that /health adds: the limits and the engine's queue."""
    traffic: Traffic | None = getattr(app.state, "tutorial_traffic", None)
    if traffic is None:
        return {}
    queue = traffic.queue()
    return {"limits": traffic.limits.public(), "queue": {**queue, "full": traffic.full(queue)},
            "keys": len(app.state.tutorial_keyring) if getattr(app.state, "tutorial_keyring", None) else 0}


def health_problem(app) -> tuple[str, str] | None:
    """(status, reason) when the engine cannot answer a new request now, else None."""
    traffic: Traffic | None = getattr(app.state, "tutorial_traffic", None)
    if traffic is None:
        return None
    if traffic.stalled():
        return "unhealthy", f"the engine produced nothing for over {STALL_SECONDS:.0f} s while requests wait"
    queue = traffic.queue()
    if traffic.full(queue):
        return "overloaded", (f"{queue['waiting']} sequences wait for the engine (bound {queue['max_waiting']}); "
                              f"new requests get 503")
    return None
