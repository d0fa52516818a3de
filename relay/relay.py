"""Your own streaming endpoint between a browser and vLLM: copy this file (and page.html) into your project.

    RELAY_TOKEN=alice-token,bob-token VLLM_API_KEY=... python relay.py --port 8100 --upstream http://127.0.0.1:8000

Needs only FastAPI, uvicorn and httpx. Each user has a token (RELAY_TOKEN); the vLLM key stays here. `POST /chat`
streams Server-Sent Events with ids `<stream id>:<n>`: `event: token` {"text"}, then exactly one `event: done`
{"finish_reason", "usage"} or `event: error` {"message", "retryable"}, and `: keep-alive` comments while vLLM is
silent. `GET /chat/resume` with `Last-Event-ID: <stream id>:<n>` replays a stream from event n+1, then goes on.
`GET /` is a page that reads the stream with `fetch`; `GET /health` says how the relay and vLLM are.
"""

import argparse
import asyncio
import json
import os
import secrets
import socket
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.sse import format_sse_event  # FastAPI's own SSE wire format
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Cache-Control: no-cache stops caches keeping the stream; X-Accel-Buffering: no tells nginx not to buffer it.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"


class Chat(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 422, not silently dropped
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status, headers=headers)


class Stream:
    """One answer's events, kept while it runs and for --resume-ttl s after, so that its user can pick it up."""

    def __init__(self, owner: str) -> None:
        self.owner, self.events, self.ended_at = owner, [], None
        self.changed = asyncio.Condition()
        self.listeners, self.task, self.stopper = 0, None, None

    async def add(self, event: bytes | None) -> None:  # None: the stream has ended
        async with self.changed:
            if event is None:
                self.ended_at = time.monotonic()
            else:
                self.events.append(event)
            self.changed.notify_all()


def create_app(args: argparse.Namespace, tokens: set[str]) -> FastAPI:
    streams: dict[str, Stream] = {}
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # One client, one connection pool, for every request. The read timeout is per read: vLLM sends nothing
        # while a long prompt is read, so it must outlast a long prefill (httpx's default is 5 s).
        headers = {"Authorization": f"Bearer {os.environ['VLLM_API_KEY']}"} if os.environ.get("VLLM_API_KEY") else {}
        async with httpx.AsyncClient(base_url=args.upstream, headers=headers,
                                     timeout=httpx.Timeout(args.read_timeout, connect=5.0)) as app.state.vllm:
            yield

    app = FastAPI(lifespan=lifespan)

    async def model_name(vllm: httpx.AsyncClient) -> str:
        if not args.model:
            models = await vllm.get("/v1/models")
            if models.status_code in (401, 403):
                raise PermissionError
            args.model = models.raise_for_status().json()["data"][0]["id"]
        return args.model

    @app.get("/health")
    async def health(request: Request):
        try:
            ok = (await request.app.state.vllm.get("/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            ok = False
        return JSONResponse({"relay": "ok", "upstream": {"url": args.upstream, "ok": ok}}, 200 if ok else 503)

    @app.get("/")
    async def page():
        return FileResponse(Path(__file__).with_name("page.html"))

    def user(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and any(secrets.compare_digest(token, known) for known in tokens)
        return token if ok else None

    def forget_old() -> None:  # streams ended more than --resume-ttl s ago; the oldest ended ones past --max-streams
        ended = sorted((s.ended_at, sid) for sid, s in streams.items() if s.ended_at is not None)
        for ended_at, sid in ended:
            if time.monotonic() - ended_at > args.resume_ttl or len(streams) >= args.max_streams:
                del streams[sid]

    @app.post("/chat")
    async def chat(request: Request):
        if not (token := user(request)):
            return error(401, "missing or wrong relay token: send `Authorization: Bearer <your token>`")
        body = b""
        async for part in request.stream():  # read at most --max-body bytes, whatever Content-Length says
            body += part
            if len(body) > args.max_body:
                return error(413, f"the request body is over {args.max_body} bytes")
        try:
            ask = Chat.model_validate_json(body)
        except ValidationError as invalid:
            first = invalid.errors()[0]
            return error(422, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}")
        if (ask.max_tokens or 0) > args.max_tokens:
            return error(422, f"max_tokens: at most {args.max_tokens} on this relay")
        forget_old()
        if len(streams) >= args.max_streams:
            return error(503, f"this relay is at its limit of {args.max_streams} streams", {"Retry-After": "5"})
        vllm: httpx.AsyncClient = request.app.state.vllm
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        payload = {**args.extra_body, **ask.model_dump(exclude_none=True), "messages": system + ask.messages,
                   "stream": True, "stream_options": {"include_usage": True}}
        try:
            payload["model"] = await model_name(vllm)
            upstream = await vllm.send(vllm.build_request("POST", "/v1/chat/completions", json=payload), stream=True)
            if upstream.status_code in (401, 403):
                await upstream.aclose()
                raise PermissionError
        except PermissionError:  # vLLM refused the relay's own key: not the user's fault
            return error(502, "the model server refused this relay's key (VLLM_API_KEY)")
        except httpx.HTTPError as failure:
            return error(502, f"the model server is unreachable ({type(failure).__name__}); try again shortly")
        if upstream.status_code != 200:  # refused before the stream began: hand on its status, words, Retry-After
            await upstream.aread()
            await upstream.aclose()
            try:
                message = upstream.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = upstream.text[:200]
            retry = {"Retry-After": upstream.headers["retry-after"]} if "retry-after" in upstream.headers else None
            return error(upstream.status_code, message, retry)
        stream_id = uuid.uuid4().hex[:12]
        stream = streams[stream_id] = Stream(token)
        stream.task = asyncio.create_task(pump(upstream, stream_id, stream))
        return StreamingResponse(follow(stream, 0), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/chat/resume")
    async def resume(request: Request, last_event_id: str = ""):  # ?last_event_id= for a client without headers
        if not (token := user(request)):
            return error(401, "missing or wrong relay token: send `Authorization: Bearer <your token>`")
        stream_id, _, number = (request.headers.get("last-event-id") or last_event_id).partition(":")
        if not number.isdigit():
            return error(400, "send `Last-Event-ID: <stream id>:<n>`, the id of the last event you got")
        forget_old()
        stream = streams.get(stream_id)
        if stream is None or not secrets.compare_digest(stream.owner, token):  # another user's stream is not yours
            return error(404, f"no stream {stream_id} to resume: unknown, or ended over {args.resume_ttl:g} s ago")
        if int(number) > len(stream.events):
            return error(400, f"stream {stream_id} has sent {len(stream.events)} events, not {number}")
        return StreamingResponse(follow(stream, int(number)), media_type="text/event-stream", headers=SSE_HEADERS)

    async def pump(upstream: httpx.Response, stream_id: str, stream: Stream) -> None:
        """vLLM's chunks as this relay's events, kept in `stream` whether anyone listens or not. Cancelled (when
        nobody has listened for --resume-grace s), it closes the upstream response: vLLM stops generating."""
        finish, usage = None, None

        def event(name: str, data: dict) -> bytes:
            return format_sse_event(event=name, data_str=json.dumps(data), id=f"{stream_id}:{len(stream.events) + 1}")

        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return await stream.add(event("done", {"finish_reason": finish, "usage": usage}))
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a failure after the 200: vLLM sends it as data, then [DONE]
                    code = chunk["error"].get("code") or 500
                    message = chunk["error"].get("message")
                    return await stream.add(event("error", {"message": message, "retryable": code >= 500}))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    if text := choice["delta"].get("content"):
                        await stream.add(event("token", {"text": text}))
            await stream.add(event("error", {"message": "the model server closed the stream early", "retryable": True}))
        except httpx.HTTPError as failure:
            await stream.add(event("error", {"message": f"the model server's stream broke ({type(failure).__name__})",
                                             "retryable": True}))
        except asyncio.CancelledError:
            await stream.add(event("error", {"message": "stopped: no client was listening", "retryable": False}))
        finally:
            await upstream.aclose()
            await stream.add(None)

    async def follow(stream: Stream, sent: int):
        """The stream's events after the first `sent`, as they come, and keep-alives while vLLM is silent. When
        the browser goes away, Starlette cancels this generator; once no client listens for --resume-grace s
        (at once by default), the pump is cancelled."""
        stream.listeners += 1
        if stream.stopper is not None:
            stream.stopper.cancel()
        try:
            while True:
                async with stream.changed:
                    try:
                        await asyncio.wait_for(stream.changed.wait_for(
                            lambda sent=sent: len(stream.events) > sent or stream.ended_at), args.keepalive or None)
                    except TimeoutError:
                        pass
                    new, ended = stream.events[sent:], stream.ended_at is not None
                if not new and not ended:
                    yield KEEPALIVE  # nothing from vLLM for --keepalive s: keep proxies from closing the stream
                for data in new:
                    yield data
                sent += len(new)
                if ended and sent == len(stream.events):
                    return
        finally:
            stream.listeners -= 1
            if stream.listeners == 0 and stream.ended_at is None:
                stream.stopper = asyncio.get_running_loop().call_later(args.resume_grace, stream.task.cancel)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Your streaming endpoint in front of vLLM.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100, help="0 picks a free port")
    parser.add_argument("--upstream", default="http://127.0.0.1:8000", help="the vLLM server, without /v1")
    parser.add_argument("--model", help="the served model (default: the first of the upstream's /v1/models)")
    parser.add_argument("--system-prompt", help="a system message put before every conversation (none by default)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="the most a user may ask for")
    parser.add_argument("--max-body", type=int, default=64 * 1024, help="the largest request body, in bytes")
    parser.add_argument("--keepalive", type=float, default=10.0, help="silent seconds before a keep-alive; 0: none")
    parser.add_argument("--extra-body", type=json.loads, default={}, help="JSON added to each request to vLLM")
    parser.add_argument("--resume-grace", type=float, default=0.0, help="seconds a stream goes on with no client "
                        "listening, for one that comes back (GET /chat/resume); 0: stop at once")
    parser.add_argument("--resume-ttl", type=float, default=300.0, help="seconds an ended stream can be resumed")
    parser.add_argument("--max-streams", type=int, default=1000, help="streams kept at once, running or ended")
    parser.add_argument("--read-timeout", type=float, default=600.0, help="seconds to wait for each read from vLLM")
    args = parser.parse_args()
    tokens = {token.strip() for token in os.environ.get("RELAY_TOKEN", "").split(",") if token.strip()}
    if not tokens:
        tokens = {secrets.token_urlsafe(12)}
        print(f"RELAY_TOKEN is not set: this run's only token is {next(iter(tokens))}")
    sock = socket.socket()  # bound before the ready line, so the line is true (and --port 0 can say which port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as failure:
        parser.exit(2, f"error: cannot listen on {args.host}:{args.port}: {failure.strerror}\n")
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    print(f"Relay ready: http://{host}:{port} -> {args.upstream} ({len(tokens)} user tokens)", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(args, tokens), log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
