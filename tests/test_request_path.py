"""The request path (streaming_tutorial/server/request_path.py, routes.py): the middlewares in their documented order,
one route table that each of them reads, and a body read from the client once. In process, no server."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX

from streaming_tutorial.server import request_path
from streaming_tutorial.server.app import create_app
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.request_path import middleware_names, our_middlewares
from streaming_tutorial.server.routes import KEYED, PUBLIC, ROUTES, UNLISTED, is_open_route, route, runs_inference

KEY = "unit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# What each of ours does, as the sentence below names it.
SAYS = {"ServerErrorMiddleware": "Starlette's error page", "ApiKeyMiddleware": "the key check",
        "BodySizeLimitMiddleware": "the body buffer", "RestartMiddleware": "engine restarts",
        "LimitsMiddleware": "the limits", "ExceptionMiddleware": "Starlette's exception handlers"}


@pytest.fixture(scope="module")
def keyed_app():
    return create_app(parse_args(["--api-key", KEY]), ("generate",))


def sentence(app) -> str:
    return ", then ".join(SAYS.get(name, f"vLLM's {name}") for name in middleware_names(app)
                          if name != "AsyncExitStackMiddleware")  # FastAPI's, for dependencies' exit stacks


def test_a_request_meets_the_key_check_then_the_body_buffer_then_restarts_then_the_limits_then_vllms_own(keyed_app):
    assert sentence(keyed_app) == (
        "Starlette's error page, then the key check, then the body buffer, then engine restarts, then the limits, "
        "then vLLM's ScalingMiddleware, then vLLM's CORSMiddleware, then vLLM's PrometheusInstrumentatorMiddleware, "
        "then Starlette's exception handlers")  # vLLM's own key check is gone: ours replaces it


def test_without_keys_there_is_no_key_check_and_vllms_own_stay_in_vllms_order():
    app = create_app(parse_args(["--enable-request-id-headers"]), ("generate",))
    assert sentence(app) == (
        "Starlette's error page, then the body buffer, then engine restarts, then the limits, "
        "then vLLM's ScalingMiddleware, then vLLM's XRequestIdMiddleware, then vLLM's CORSMiddleware, "
        "then vLLM's PrometheusInstrumentatorMiddleware, then Starlette's exception handlers")


def test_the_documented_list_is_the_list_that_runs(keyed_app):
    """request_path.py's docstring numbers our middlewares; `our_middlewares` builds them; the app runs them."""
    documented = re.findall(r"^\s+\d\. (\w+)", request_path.__doc__, re.MULTILINE)
    built = [m.cls.__name__ for m in our_middlewares(keyed_app, keyed_app.state.tutorial_keyring)]
    running = middleware_names(keyed_app)[1:1 + len(built)]  # after Starlette's ServerErrorMiddleware
    assert documented == built == running == ["ApiKeyMiddleware", "BodySizeLimitMiddleware", "RestartMiddleware",
                                              "LimitsMiddleware"]


# ---- one route table ----

def served(app) -> set[tuple[str, str]]:
    """Every (path template, method) the app serves."""
    return {(r.path + ("/" if isinstance(r, Mount) else ""), method) for r in app.routes
            for method in (getattr(r, "methods", None) or {"GET"}) - {"HEAD"}}


def test_every_route_the_app_serves_is_in_the_route_table(keyed_app):
    unlisted = sorted({path for path, _ in served(keyed_app) if route(path) is UNLISTED})
    assert not unlisted, f"say what these are in streaming_tutorial/server/routes.py: {unlisted}"
    paths = {path for path, _ in served(keyed_app)}
    assert not [path for path in ROUTES if "{" not in path and path not in paths], "a listed route is gone"


def test_routes_vllms_key_check_leaves_open_run_inference_and_need_our_key():
    for path in ("/invocations", "/generative_scoring"):
        assert not path.startswith(GUARDED_PREFIX)  # vLLM's own check would let them through
        assert runs_inference(path, "POST") and not is_open_route(path, "POST") and route(path).needs_engine


def test_a_route_the_table_does_not_list_fails_closed():
    assert route("/v2/a_future_route") is UNLISTED
    assert not is_open_route("/v2/a_future_route", "GET") and runs_inference("/v2/a_future_route", "POST")
    assert route("/page/app.js") is PUBLIC and route("/v1/responses/resp_1/cancel") is KEYED
    assert not runs_inference("/v1/chat/completions", "GET")  # only a POST feeds the engine


def test_while_the_engine_restarts_exactly_the_routes_that_need_it_get_503(keyed_app):
    restart = keyed_app.state.tutorial_restart
    restart.status, restart.began = "restarting", time.monotonic()
    try:
        client = TestClient(keyed_app, raise_server_exceptions=False)
        for path, method in sorted(served(keyed_app)):
            asked = path.replace("{response_id}", "resp_1")
            status = client.request(method, asked, headers=AUTH, json={}).status_code
            assert (status == 503) == route(asked).needs_engine, (method, path, status)
    finally:
        restart.status, restart.began = "healthy", None


# ---- one body buffer ----

async def call(app, path: str, chunks: list[bytes]) -> tuple[int, bytes, int]:
    """One request through the whole app, its body sent in `chunks`: (status, response body, receive() calls)."""
    calls = 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if calls <= len(chunks):
            return {"type": "http.request", "body": chunks[calls - 1], "more_body": calls < len(chunks)}
        await asyncio.Event().wait()  # the client never hangs up
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {KEY}".encode())]}
    await asyncio.wait_for(app(scope, receive, send), 30)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), calls


def count_receives(app) -> list[tuple[str, list[int]]]:
    """Count, at the way into each layer of the app's middleware stack, the receive() calls made by that layer and
    the layers inside it (a layer that replays the body answers those inside it itself)."""
    counts, layer = [], app.middleware_stack
    while layer is not None and layer is not app.router:
        inner, count = layer.app, [0]

        async def counted(scope, receive, send, inner=inner, count=count):
            async def counting_receive():
                count[0] += 1
                return await receive()
            await inner(scope, counting_receive, send)

        counts.append((type(inner).__name__, count))
        layer.app, layer = counted, inner
    return counts


def test_a_body_is_read_from_the_client_once_for_the_whole_stack():
    """Only the body buffer reads the client's chunks; everything inside it (restarts, the limits, which parse
    the body, vLLM's middlewares, the route) gets the one buffered body, and the client is never asked again."""
    app = create_app(parse_args(["--api-key", KEY]), ("generate",))

    async def echo(request):  # in place of vLLM's chat route, which needs an engine: reads the body as vLLM does
        return Response(str(len(await request.body())).encode())

    app.router.routes.insert(0, Route("/v1/chat/completions", echo, methods=["POST"]))
    counts = count_receives(app)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 1000}]}).encode()
    chunks = [body[:1000], body[1000:2000], body[2000:]]
    assert asyncio.run(call(app, "/v1/chat/completions", chunks)) == (200, str(len(body)).encode(), 3)
    seen = [(name, count[0]) for name, count in counts]
    assert seen[:3] == [("ApiKeyMiddleware", 3), ("BodySizeLimitMiddleware", 3), ("RestartMiddleware", 1)]
    assert all(received == 1 for _, received in seen[2:]), seen  # inside the buffer: one message, the whole body
    # The limits read the same buffered body: over a limit, a 400, and still one read per chunk.
    over = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 99}).encode()
    status, answer, calls = asyncio.run(call(app, "/v1/chat/completions", [over[:10], over[10:]]))
    assert (status, json.loads(answer)["error"]["param"], calls) == (400, "n", 2)
