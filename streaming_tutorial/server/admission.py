"""Admission on a shared server: who may start a request now, what is in flight, and what it cost (issue 11).

Right in front of vLLM's middlewares, inside the key check, the body buffer and engine restarts (the order is in
server/request_path.py), `LimitsMiddleware` runs the per-request checks (server/request_checks.py) on every route
that runs inference (server/routes.py), then decides on what is running now:

1. Per-key concurrency: at most K requests in flight per API key (a keys file may give a key its own K); more
   get a 429 with Retry-After. Requests made with a key that is removed from the keys file end: a stream gets a
   last `data: {"error": ...}` then `data: [DONE]`, and its engine request is aborted.
2. Bounded waiting: when the engine's queue is full (see `Traffic.full`), new requests get a 503 with
   Retry-After at once, and /health says "overloaded" (503) instead of "healthy".
3. Per key name (never the key): Prometheus counters in vLLM's /metrics (`tutorial:requests_total`,
   `tutorial:prompt_tokens_total`, `tutorial:generation_tokens_total`, `tutorial:rejections_total{reason}`), and
   one log line per finished request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streaming_tutorial.server.keys import POLL_SECONDS, Key, KeyRing
from streaming_tutorial.server.request_checks import Limits, cap_default_output_tokens, check_request, request_sequences
from streaming_tutorial.server.routes import route_path, runs_inference
from streaming_tutorial.server.security import KEY, error_body, read_body, send_error
from streaming_tutorial.server.traffic import (
    ANONYMOUS,
    CURRENT,
    STALL_SECONDS,
    Flight,
    Traffic,
    count_engine_tokens,
    counters,
)

logger = logging.getLogger("vllm.streaming_tutorial.server.admission")  # under "vllm": vLLM's log format and handler

RETRY_AFTER_CONCURRENCY_S = 2  # a short answer of the bundled model takes a few seconds
RETRY_AFTER_QUEUE_S = 10
# ---- the middleware ----

# No API request nests JSON more than a few levels (a tool's parameter schema perhaps a dozen).
TOO_DEEP = ("The request body's JSON is nested too deeply (arrays or objects inside each other, hundreds of levels) "
            "for this server to read. No API request needs that: send a flatter body.")


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


class LimitsMiddleware:
    """Pure ASGI, inside the key check and the body buffer (server/request_path.py), on the routes that run
    inference (server/routes.py): per-request limits (400), per-key concurrency (429), the queue bound (503), then
    runs the request so that it can be ended if its key is removed, and counts and logs it when it finishes."""

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
        path = route_path(scope)
        if not runs_inference(path, scope.get("method", "GET")):
            return await self.app(scope, receive, send)
        # The body the body buffer read (server/security.py); read here only in a stack without it.
        body_bytes, receive = await read_body(scope, receive)
        key: Key | None = scope.get(KEY)
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


# ---- wiring ----

def install_limits(app, args, model_config=None, keyring: KeyRing | None = None) -> None:
    """Add the limits' state (read by `LimitsMiddleware`, which server/request_path.py puts in its place), the
    per-key counters and the keys-file watcher to vLLM's app."""
    limits = Limits.from_args(args)
    traffic = Traffic(limits)
    app.state.tutorial_limits = limits
    app.state.tutorial_traffic = traffic
    app.state.tutorial_keyring = keyring
    counters()
    cap_default_output_tokens(model_config, limits.max_output_tokens)
    if keyring is not None:
        keyring.on_change(traffic.revoke)

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
    and again for each new engine after an engine restart (streaming_tutorial/server/engine_restart.py)."""
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
