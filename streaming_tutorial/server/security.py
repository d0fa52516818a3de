"""What `streaming_server.py` adds to vLLM 0.32 to make a shared classroom server safe to expose.

- `ApiKeyMiddleware`: with `--api-key` (or `VLLM_API_KEY`) or `--api-keys-file`, *every* route needs a key
  except the harmless read-only routes the route table opens (server/routes.py). vLLM's own middleware guards
  only paths starting with `/v1`, `/v2`, `/inference`, `/cohere`, which leaves `/invocations` and
  `/generative_scoring` (both run inference), `/scale_elastic_ep` (an admin action), `/tokenize`, `/detokenize`
  and `/kv_event_sources` open. An allowlist fails closed: a route a future vLLM adds is guarded until someone
  decides it is harmless.
- `BodySizeLimitMiddleware`: the one place a request's body is read (`read_body`): a body larger than
  `max_bytes` gets a 413 before anything parses it (vLLM reads any body whole into memory first; thirty laptops
  can send a lot of bytes); an accepted one is kept in the scope for the limits and replayed to vLLM.
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
from streaming_tutorial.server.routes import is_open_route, route_path

# 16 MiB: far above the longest prompt a text model's context holds (vLLM itself rejects a prompt over
# ~81 characters per token of max_model_len), small enough that a classroom cannot fill the server's RAM.
DEFAULT_MAX_BODY_BYTES = 16 << 20
MAX_BODY_ENV = "TUTORIAL_MAX_BODY_BYTES"
# What the middlewares leave in the scope for those inside them (the limits, server/admission.py): the request's
# key (a `Key`, whose name labels its counters) and its body, read once.
KEY = "tutorial.key"
BODY = "tutorial.body"
UNAUTHORIZED = ("Unauthorized: this server needs an API key, sent as the header `Authorization: Bearer <key>` "
                "(OpenAI's clients) or `x-api-key: <key>` (Anthropic's). Ask the person who runs it for one.")


def error_body(message: str, type_: str, code: int, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


async def send_error(send: Send, status: int, body: bytes, extra_headers: Iterable[tuple[bytes, bytes]] = ()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Pure ASGI: a request to any route the route table (server/routes.py) does not open needs a key, else
    401: `Authorization: Bearer <key>` (OpenAI's clients, vLLM's own check) or `x-api-key: <key>` (Anthropic's SDK
    and docs, for `/v1/messages`).

    The keys live in a `KeyRing` (streaming_tutorial/server/keys.py): `--api-key` values and a keys file that is
    re-read when it changes (looked at, at most once a second, on a request; the server also polls it). The
    matching key is put in the scope as `scope[KEY]` for the limits (which label counters with its name).
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
        if method == "OPTIONS" or is_open_route(route_path(scope), method):
            return await self.app(scope, receive, send)
        if (key := self.key_of(scope)) is not None:
            scope[KEY] = key
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
    """Pure ASGI: reads an HTTP request's body, once for the whole app (`read_body`), and answers 413 when it
    exceeds `max_bytes`, before the app parses it.

    A declared `Content-Length` over the limit is refused without reading; a chunked body is read up to
    the limit and then refused. An accepted body is kept in the scope (`scope[BODY]`, for the limits) and
    replayed to the app, and after it the app receives from the client directly again, so vLLM still sees a
    disconnect (and aborts the request).
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
        body, receive = await read_body(scope, receive, self.max_bytes)
        if body is None:
            return await send_error(send, 413, self.too_large(), [(b"connection", b"close")])
        await self.app(scope, receive, send)


async def read_body(scope: Scope, receive: Receive, max_bytes: int | None = None) -> tuple[bytes | None, Receive]:
    """The request's body and a `receive` that replays it, then receives from the client again (a disconnect).

    The body is read from the client once per request: the first caller (BodySizeLimitMiddleware, in the
    server) reads it and keeps it in `scope[BODY]`; a caller inside it gets it from there, with the `receive`
    it was given (which already replays it). None when the body is over `max_bytes` (then nothing is kept).
    A client that hangs up before the end leaves the part it sent, and its disconnect is replayed."""
    if (kept := scope.get(BODY)) is not None:
        return kept, receive
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break  # a disconnect: hand it on
        size += len(message.get("body", b""))
        if max_bytes is not None and size > max_bytes:
            return None, receive
        if not message.get("more_body", False):
            break
    body = scope[BODY] = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
    replay: list[Message] = ([{"type": "http.request", "body": body, "more_body": False}]
                             if messages[-1]["type"] == "http.request" else messages[-1:])

    async def replaying_receive() -> Message:
        return replay.pop(0) if replay else await receive()

    return body, replaying_receive


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
