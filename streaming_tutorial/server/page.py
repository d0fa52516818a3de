"""The classroom page that `streaming_server.py` serves at `GET /`, with its files under `/page/` (issue 10).

The page (`streaming_tutorial/server/static/`) is plain HTML, CSS and JavaScript modules: no build step, nothing
fetched from another origin, every URL relative (so it works under `--root-path` and behind a proxy). It
holds no secret: with `--api-key` the user pastes the key into the page, which keeps it in sessionStorage.
`--no-page` leaves only the API.

One route is not a file: `POST /page/race`. A browser opens at most 6 HTTP/1.1 connections to one server,
so a 16-lane race made of 16 fetches would run 6 lanes at a time (and stall the panel's polling). The page
therefore sends the race as one request; this route makes each lane's request to `/v1/chat/completions`
inside this server, through the whole app (API key, limits, vLLM), exactly as a client's request would go,
and relays each lane's status and raw SSE text, tagged with its lane. Closing the race's connection cancels
every lane, which aborts them in the engine.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import json
import logging
from argparse import Namespace
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from streaming_tutorial.server.security import error_body

logger = logging.getLogger("vllm.streaming_tutorial.server.page")  # under "vllm": vLLM's log format and handler
STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/page/"
MAX_LANES = 16
# Only this server's own files and API; no inline script or style, no other origin, not framed.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (a cheap 304), so an edited file shows on the next reload.
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The scope keys a lane's request inherits from the race's request (client address, server, root path...).
INHERITED_SCOPE_KEYS = ("type", "asgi", "http_version", "server", "client", "scheme", "root_path", "state",
                        "extensions")


def add_page_args(parser) -> None:
    """Add this server's page flags to vLLM's parser."""
    parser.add_argument("--no-page", action="store_true",
                        help="Do not serve the classroom page at / (nor its files under /page/); the API is "
                             "the same either way.")


def mount_page(app, args: Namespace) -> None:
    """Add the page's routes to vLLM's app (unless `--no-page`)."""
    if getattr(args, "no_page", False):
        return
    routes = [Route("/", file_endpoint(STATIC_DIR / "index.html"), methods=["GET"], include_in_schema=False),
              Route(PREFIX + "race", race, methods=["POST"], include_in_schema=False)]
    # One route per file, fixed at start-up: nothing outside the folder can be asked for.
    routes += [Route(PREFIX + path.name, file_endpoint(path), methods=["GET"], include_in_schema=False)
               for path in sorted(STATIC_DIR.iterdir()) if path.suffix in MEDIA_TYPES and path.name != "index.html"]
    app.router.routes.extend(routes)


def file_endpoint(path: Path):
    async def endpoint(request: Request) -> Response:
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)
    return endpoint


async def race(request: Request) -> Response:
    """`{"requests": [chat completion body, ...]}` (1 to MAX_LANES) -> one SSE stream of the lanes' events:
    `{"lane": i, "status": 200, "retry_after": null}` when lane i's response starts, `{"lane": i, "text": ...}`
    for each piece of its body (its own SSE, unparsed), `{"lane": i, "end": true}`; then `[DONE]`."""
    try:
        bodies = (await request.json())["requests"]
        if not (isinstance(bodies, list) and 1 <= len(bodies) <= MAX_LANES
                and all(isinstance(body, dict) for body in bodies)):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        message = f'A race is {{"requests": [...]}} with 1 to {MAX_LANES} chat completion request bodies.'
        return Response(error_body(message, "BadRequestError", 400), status_code=400,
                        media_type="application/json")
    return StreamingResponse(relay(request, bodies), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def relay(request: Request, bodies: list[dict]):
    events: asyncio.Queue[dict] = asyncio.Queue()
    lanes = [asyncio.create_task(run_lane(request, i, body, events.put_nowait)) for i, body in enumerate(bodies)]
    try:
        running = len(lanes)
        while running:
            event = await events.get()
            running -= bool(event.get("end"))
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the page stopped the race or went away: stop every lane (vLLM aborts each request)
        for lane in lanes:
            lane.cancel()


async def run_lane(request: Request, index: int, body: dict, emit) -> None:
    """Send one chat completion request through the whole app, as if it came from the race's client."""
    payload = json.dumps(body).encode()
    path = request.scope["path"].removesuffix("page/race") + "v1/chat/completions"
    replaced = (b"content-length", b"content-type", b"accept", b"x-request-id")
    headers = [(name, value) for name, value in request.scope["headers"] if name not in replaced]
    if request_id := request.headers.get("x-request-id"):  # vLLM takes it as the engine's request id: one each
        headers.append((b"x-request-id", f"{request_id}-lane{index + 1}".encode()))
    # Copies, not shared: vLLM keeps per-request data in `request.state` (the scope's "state" dict).
    scope = {key: copy.copy(request.scope[key]) for key in INHERITED_SCOPE_KEYS if key in request.scope}
    scope.update(method="POST", path=path, raw_path=path.encode(), query_string=b"",
                 headers=[*headers, (b"content-type", b"application/json"), (b"accept", b"text/event-stream"),
                          (b"content-length", str(len(payload)).encode())])
    pending = [{"type": "http.request", "body": payload, "more_body": False}]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client never hangs up by itself: the lane ends by cancellation
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            retry_after = dict(message.get("headers") or []).get(b"retry-after")
            emit({"lane": index, "status": message["status"],
                  "retry_after": retry_after.decode() if retry_after else None})
        elif message["type"] == "http.response.body":
            if text := decoder.decode(message.get("body", b""), final=not message.get("more_body", False)):
                emit({"lane": index, "text": text})

    try:
        await request.app(scope, receive, send)
    except Exception:  # Starlette has already answered 500 (the lane shows it); keep the why in the log
        logger.exception("Race lane %d failed", index)
    finally:
        emit({"lane": index, "end": True})
