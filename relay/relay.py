"""Your own streaming endpoint between a browser and vLLM: copy this file (and page.html) into your project.

    RELAY_TOKEN=alice-token,bob-token VLLM_API_KEY=... python relay.py --port 8100 --upstream http://127.0.0.1:8000
    curl -N localhost:8100/chat -H "Authorization: Bearer alice-token" \
         -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Needs only FastAPI, uvicorn and httpx. The browser holds a relay token (one per user, RELAY_TOKEN, comma-separated)
and never sees the vLLM key (VLLM_API_KEY). `POST /chat` answers Server-Sent Events, each with an `id:` of the
form `<stream id>:<n>`: `event: token` {"text"} for each piece of text, then exactly one terminal event,
`event: done` {"finish_reason", "usage"} or `event: error` {"message", "retryable"}, so a client can always tell a
whole answer from a cut one. While nothing else is sent (a queue, a long prefill) a `: keep-alive` comment goes out
every --keepalive seconds, so that proxies' idle timeouts do not cut the stream. `GET /` is a small page that
reads the stream with `fetch`; `GET /health` says how the relay and vLLM are.
"""

import argparse
import asyncio
import json
import os
import secrets
import socket
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


def create_app(args: argparse.Namespace, tokens: set[str]) -> FastAPI:
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
            upstream = (await request.app.state.vllm.get("/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            upstream = False
        body = {"relay": "ok", "upstream": {"url": args.upstream, "ok": upstream}}
        return JSONResponse(body, 200 if upstream else 503)

    @app.get("/")
    async def page():
        return FileResponse(Path(__file__).with_name("page.html"))

    @app.post("/chat")
    async def chat(request: Request):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, known) for known in tokens):
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
        if upstream.status_code != 200:  # refused before the stream began: hand on its status and Retry-After
            await upstream.aread()
            await upstream.aclose()
            try:
                message = upstream.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = upstream.text[:200]
            retry = {"Retry-After": upstream.headers["retry-after"]} if "retry-after" in upstream.headers else None
            return error(upstream.status_code, message, retry)
        return StreamingResponse(relay(upstream, uuid.uuid4().hex[:12]), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    async def relay(upstream: httpx.Response, stream_id: str):
        """vLLM's chunks as this relay's events. If the browser goes away, Starlette cancels this generator, and
        `finally` closes the upstream response: vLLM sees the disconnect and stops generating."""
        number = 0

        def event(name: str, data: dict) -> bytes:
            nonlocal number
            number += 1
            return format_sse_event(event=name, data_str=json.dumps(data), id=f"{stream_id}:{number}")

        lines = upstream.aiter_lines()
        pending = None
        finish, usage = None, None
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(lines))
                done, _ = await asyncio.wait({pending}, timeout=args.keepalive or None)
                if not done:
                    yield KEEPALIVE  # nothing from vLLM for --keepalive s: keep proxies from closing the stream
                    continue
                line, pending = pending.result(), None
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    yield event("done", {"finish_reason": finish, "usage": usage})
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a failure after the 200: vLLM sends it as data, then [DONE]
                    code = chunk["error"].get("code") or 500
                    yield event("error", {"message": chunk["error"].get("message"), "retryable": code >= 500})
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    if text := choice["delta"].get("content"):
                        yield event("token", {"text": text})
        except StopAsyncIteration:  # the stream ended without [DONE]: it was cut
            yield event("error", {"message": "the model server closed the stream early", "retryable": True})
        except httpx.HTTPError as failure:
            yield event("error", {"message": f"the model server's stream broke ({type(failure).__name__})",
                                  "retryable": True})
        finally:
            if pending is not None:
                pending.cancel()
            await upstream.aclose()

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
    parser.add_argument("--extra-body", type=json.loads, default={}, help='JSON fields added to every request '
                        'to vLLM, e.g. \'{"top_p": 0.9}\'')
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
