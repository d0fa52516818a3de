"""What `streaming_server.py` adds to vLLM 0.32 to make a shared classroom server safe to expose.

- `ApiKeyMiddleware`: with `--api-key` (or `VLLM_API_KEY`) or `--api-keys-file`, *every* route needs a key
  except an explicit allowlist of harmless read-only routes. vLLM's own middleware guards only paths starting
  with `/v1`, `/v2`, `/inference`, `/cohere`, which leaves `/invocations` and `/generative_scoring` (both run
  inference), `/scale_elastic_ep` (an admin action), `/tokenize`, `/detokenize` and `/kv_event_sources` open. An
  allowlist fails closed: a route a future vLLM adds is guarded until someone decides it is harmless.
- `BodySizeLimitMiddleware`: a request body larger than `max_bytes` gets a 413 before anything parses it
  (vLLM reads any body whole into memory first; thirty laptops can send a lot of bytes).
- `non_loopback_warning`: the line `main()` logs when asked to listen beyond this machine without a key.

Errors use vLLM's error shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streaming_tutorial.server.keys import POLL_SECONDS, Key, KeyRing, flag_keys

# Routes anyone may call without the key, with the methods allowed. Each is read-only and runs no inference:
# liveness and load probes (`/health`, `/ping`, `/load`; SageMaker sends `POST /ping`), the vLLM version,
# Prometheus metrics (scrapers rarely carry bearer tokens; counts and latencies only, no prompts), and the
# OpenAPI docs (which describe vLLM's public API, nothing about this server's data).
OPEN_ROUTES: dict[str, frozenset[str]] = {
    "/health": frozenset({"GET", "HEAD"}),
    "/ping": frozenset({"GET", "HEAD", "POST"}),
    "/load": frozenset({"GET", "HEAD"}),
    "/version": frozenset({"GET", "HEAD"}),
    "/metrics": frozenset({"GET", "HEAD"}),
    "/metrics/": frozenset({"GET", "HEAD"}),
    "/openapi.json": frozenset({"GET", "HEAD"}),
    "/docs": frozenset({"GET", "HEAD"}),
    "/docs/oauth2-redirect": frozenset({"GET", "HEAD"}),
    "/redoc": frozenset({"GET", "HEAD"}),
    # The classroom page (streaming_tutorial/server/page.py): static files that hold no secret; the user pastes the
    # key into the page, which sends it with each API call.
    "/": frozenset({"GET", "HEAD"}),
}
# Path prefixes open to GET/HEAD: the page's static assets.
OPEN_PREFIXES = ("/page/",)

# 16 MiB: far above the longest prompt a text model's context holds (vLLM itself rejects a prompt over
# ~81 characters per token of max_model_len), small enough that a classroom cannot fill the server's RAM.
DEFAULT_MAX_BODY_BYTES = 16 << 20
MAX_BODY_ENV = "TUTORIAL_MAX_BODY_BYTES"
UNAUTHORIZED = ("Unauthorized: this server needs an API key, sent as the header `Authorization: Bearer <key>` "
                "(OpenAI's clients) or `x-api-key: <key>` (Anthropic's). Ask the person who runs it for one.")


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


async def send_error(send: Send, status: int, body: bytes, extra_headers: Iterable[tuple[bytes, bytes]] = ()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


def is_open_route(path: str, method: str) -> bool:
    if method in ("GET", "HEAD") and path.startswith(OPEN_PREFIXES):
        return True
    return method in OPEN_ROUTES.get(path, ())


class ApiKeyMiddleware:
    """Pure ASGI: a request to any route outside `OPEN_ROUTES` needs a key, else 401: `Authorization: Bearer <key>`
    (OpenAI's clients, vLLM's own check) or `x-api-key: <key>` (Anthropic's SDK and docs, for `/v1/messages`).

    The keys live in a `KeyRing` (streaming_tutorial/server/keys.py): `--api-key` values and a keys file that is
    re-read when it changes (looked at, at most once a second, on a request; the server also polls it). The
    matching key (its name, never the key) is put in the scope as `scope["tutorial.key"]` for the limits.
    Paths are compared after removing `--root-path`, as vLLM's own middleware does. CORS preflights
    (OPTIONS) pass, as in vLLM, since browsers never send credentials with them.
    """

    def __init__(self, app: ASGIApp, tokens: list[str] | None = None, keyring: KeyRing | None = None,
                 on_unauthorized: Callable[[Scope], None] | None = None) -> None:
        if keyring is None:
            if not tokens:
                raise ValueError("ApiKeyMiddleware needs at least one key")
            keyring = KeyRing(flag_keys(tokens))
        self.app = app
        self.keyring = keyring
        self.on_unauthorized = on_unauthorized
        self.next_refresh = 0.0

    def key_of(self, scope: Scope) -> Key | None:
        now = time.monotonic()
        if now >= self.next_refresh:  # a stat() call at most once a second
            self.next_refresh = now + POLL_SECONDS
            self.keyring.refresh()
        for token in presented_keys(scope):
            if (key := self.keyring.lookup(token)) is not None:
                return key
        return None

    def authorized(self, scope: Scope) -> bool:
        return self.key_of(scope) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if method == "OPTIONS" or is_open_route(path, method):
            return await self.app(scope, receive, send)
        if (key := self.key_of(scope)) is not None:
            scope["tutorial.key"] = key
            return await self.app(scope, receive, send)
        if self.on_unauthorized is not None:
            self.on_unauthorized(scope)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "Unauthorized"})
            return
        await send_error(send, 401, error_body(UNAUTHORIZED, "Unauthorized", 401), [(b"www-authenticate", b"Bearer")])



def presented_keys(scope: Scope) -> list[str]:
    """The keys a request offers, bearer token first. Anthropic's docs and SDK send `x-api-key` (to
    `/v1/messages`, which vLLM serves); OpenAI's clients and vLLM's own check use the bearer token. Accepting
    both on every route keeps one rule: the header's name is the only difference."""
    headers = dict(scope.get("headers") or [])
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    offered = [token.strip()] if scheme.lower() == "bearer" else []
    if api_key := headers.get(b"x-api-key", b"").decode("latin-1").strip():
        offered.append(api_key)
    return offered


class BodySizeLimitMiddleware:
    """Pure ASGI: answers 413 to an HTTP request whose body exceeds `max_bytes`, before the app reads it.

    A declared `Content-Length` over the limit is refused without reading; a chunked body is read up to
    the limit and then refused. An accepted body is replayed to the app, and after it the app receives
    from the client directly again, so vLLM still sees a disconnect (and aborts the request).
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> bytes:
        return error_body(f"Request body too large: the limit is {self.max_bytes} bytes.",
                          "Request Entity Too Large", 413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if declared is not None and int(declared) > self.max_bytes:
                return await send_error(send, 413, self.too_large(), [(b"connection", b"close")])
        except ValueError:
            return await send_error(send, 400, error_body("Invalid Content-Length header.", "Bad Request", 400))
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # a disconnect: hand it on
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await send_error(send, 413, self.too_large(), [(b"connection", b"close")])
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        scope["tutorial.body"] = body  # for the limits middleware (server/admission.py): read once
        replay: list[Message] = ([{"type": "http.request", "body": body, "more_body": False}]
                                 if messages[-1]["type"] == "http.request" else messages[-1:])

        async def replaying_receive() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replaying_receive, send)


def max_body_bytes_from_env() -> int:
    value = os.environ.get(MAX_BODY_ENV)
    return int(value) if value else DEFAULT_MAX_BODY_BYTES


def api_keys(args) -> list[str]:
    """The keys vLLM itself would enforce: `--api-key` (repeatable) wins over `VLLM_API_KEY`."""
    return [key for key in (args.api_key or [os.environ.get("VLLM_API_KEY")]) if key]


def is_loopback(host: str | None) -> bool:
    """Whether binding `host` keeps the server on this machine. None/"" means all interfaces to uvicorn."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def non_loopback_warning(host: str | None, keys: list[str], uds: str | None = None) -> str | None:
    """The warning to log when the server would be reachable from other machines without an API key."""
    if uds or is_loopback(host) or keys:
        return None
    where = host or "all interfaces"
    return (f"SECURITY WARNING: listening on {where} without an API key: anyone who can reach this machine "
            f"can run inference and call admin routes. Add --api-key <secret> (or set VLLM_API_KEY), "
            f"or bind --host 127.0.0.1.")
