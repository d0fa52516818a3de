"""`--api-key` protects every route that runs inference or acts on the server, not only vLLM's /v1 prefix.

In-process tests build the app with `create_app` (no engine) and walk `app.routes`, so a
route a future vLLM adds is caught; end-to-end tests use the `keyed_server` fixture (tests/conftest.py),
which also checks `--served-model-name`, `--max-model-len` and `--root-path` through a real server."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_checks import WORKSHOP_KEY, WORKSHOP_MAX_MODEL_LEN, WORKSHOP_MODEL, WORKSHOP_ROOT_PATH, error_of
from starlette.routing import Mount
from starlette.testclient import TestClient

from streaming_tutorial.server.app import create_app
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.routes import ROUTES, is_open_route

# The decision, spelled out: these and only these answer without a key (see routes.py for why).
EXPECTED_OPEN = {"/health", "/ping", "/load", "/version", "/metrics", "/metrics/", "/openapi.json", "/docs",
                 "/docs/oauth2-redirect", "/redoc", "/", "/page/{file:path}"}  # the classroom page (static, no secret)
# Routes vLLM 0.32's own middleware leaves open although they run inference or act on the server.
VLLM_GAPS = ["/invocations", "/generative_scoring", "/scale_elastic_ep", "/tokenize", "/detokenize",
             "/kv_event_sources", "/is_scaling_elastic_ep"]


def app_routes(app) -> list[tuple[str, str]]:
    """Every (path, method) the app serves, path parameters filled in."""
    found = []
    for route in app.routes:
        methods = sorted((getattr(route, "methods", None) or {"GET"}) - {"HEAD"})
        path = route.path.replace("{response_id}", "resp_x")
        if isinstance(route, Mount):
            path += "/"
        found += [(path, method) for method in methods]
    return found


@pytest.fixture(scope="module")
def keyed_app():
    args = parse_args(["--api-key", "unit-key"])
    return create_app(args, ("generate",))


def test_open_routes_are_exactly_the_harmless_read_only_ones():
    open_routes = {path: route.open_methods for path, route in ROUTES.items() if route.open_methods}
    assert set(open_routes) == EXPECTED_OPEN
    for path, methods in open_routes.items():
        assert methods <= {"GET", "HEAD"} or path == "/ping", (path, methods)  # SageMaker pings with POST
        assert not ROUTES[path].runs_inference, path


def test_every_route_but_the_open_ones_needs_the_key(keyed_app):
    routes = app_routes(keyed_app)
    assert {p for p, _ in routes} >= {"/v1/chat/completions", "/v1/completions", *VLLM_GAPS}
    client = TestClient(keyed_app, raise_server_exceptions=False)
    guarded = 0
    for path, method in routes:
        without = client.request(method, path)
        wrong = client.request(method, path, headers={"Authorization": "Bearer wrong-key"})
        with_key = client.request(method, path, headers={"Authorization": "Bearer unit-key"})
        if is_open_route(path, method):
            assert without.status_code != 401, (method, path)
        else:
            guarded += 1
            for response in (without, wrong):
                assert response.status_code == 401, (method, path, response.status_code)
                assert error_of(response)["code"] == 401
            assert with_key.status_code != 401, (method, path)
    assert guarded >= 25


def test_vllm_api_key_variable_also_guards(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    app = create_app(parse_args([]), ("generate",))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/invocations", json={}).status_code == 401
    assert client.post("/invocations", json={}, headers={"Authorization": "Bearer from-env"}).status_code != 401


@pytest.mark.parametrize("keys_from", ["--api-key", "--api-keys-file"])
def test_x_api_key_header_is_taken_like_the_bearer_token(tmp_path, monkeypatch, keys_from):
    """Anthropic's docs send the key as `x-api-key`; the SDKs of OpenAI (and vLLM's own check) as a bearer token.
    With `--api-key` alone our middleware replaces vLLM's (which knows only the bearer token) all the same."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("ada:file-key\n")
    flags, key = (["--api-key", "unit-key"], "unit-key") if keys_from == "--api-key" else \
        (["--api-keys-file", str(keys_file)], "file-key")
    client = TestClient(create_app(parse_args(flags), ("generate",)),
                        raise_server_exceptions=False)
    for path in ("/v1/messages", "/v1/chat/completions", "/invocations"):
        assert client.post(path, json={}, headers={"x-api-key": key}).status_code != 401, path
        refused = client.post(path, json={}, headers={"x-api-key": "wrong-key"})
        assert refused.status_code == 401, path
        assert "x-api-key" in error_of(refused)["message"]  # the 401 names both headers
    # A wrong bearer token does not hide a right `x-api-key` (a client may send both, one of them stale).
    both = {"Authorization": "Bearer stale", "x-api-key": key}
    assert client.post("/v1/messages", json={}, headers=both).status_code != 401


def test_without_a_key_nothing_is_guarded(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    app = create_app(parse_args([]), ("generate",))
    assert TestClient(app, raise_server_exceptions=False).post("/invocations", json={}).status_code != 401


# ---- end to end, against a server started with --api-key (and a root path) ----

def keyed_routes(keyed_server) -> list[tuple[str, str]]:
    """The routes the running server documents, plus the ones it serves without documenting them."""
    spec = httpx.get(keyed_server.url_for("openapi.json"), timeout=30).json()
    assert spec["servers"] == [{"url": WORKSHOP_ROOT_PATH}]
    documented = {(p.replace("{response_id}", "resp_x"), m.upper()) for p, ops in spec["paths"].items() for m in ops}
    in_process = set(app_routes(create_app(
        parse_args(["--api-key", "x"]), ("generate",))))
    return sorted(documented | in_process)


@pytest.mark.parametrize("prefix", ["", WORKSHOP_ROOT_PATH])
def test_keyed_server_guards_every_route(keyed_server, prefix):
    auth = {"Authorization": f"Bearer {WORKSHOP_KEY}"}
    with httpx.Client(base_url=keyed_server.url + prefix, timeout=60) as http:
        checked = []
        for path, method in keyed_routes(keyed_server):
            if is_open_route(path, method):
                assert http.request(method, path).status_code == 200, (method, path)
                continue
            response = http.request(method, path, json={})
            assert response.status_code == 401, (method, prefix + path, response.status_code, response.text)
            assert error_of(response)["code"] == 401
            # With the key the request reaches the route (an empty body is then the route's own 4xx).
            keyed = http.request(method, path, json={}, headers=auth)
            assert keyed.status_code != 401 and keyed.status_code < 500, (method, path, keyed.text)
            if keyed.status_code in (404, 405):  # the route's own "not found", not the router's
                assert error_of(keyed)["message"] not in ("Not Found", "Method Not Allowed"), (method, path)
            checked.append(path)
        assert set(VLLM_GAPS) <= set(checked)


def test_invocations_runs_inference_only_with_the_key(keyed_server):
    body = {"model": WORKSHOP_MODEL, "prompt": "Hello", "max_tokens": 3}
    url = keyed_server.url_for("invocations")
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {WORKSHOP_KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_workshop_client_streams_with_the_key(keyed_server):
    client = openai.OpenAI(base_url=keyed_server.url + WORKSHOP_ROOT_PATH + "/v1", api_key=WORKSHOP_KEY,
                           max_retries=0)
    assert [m.id for m in client.models.list().data] == [WORKSHOP_MODEL]
    stream = client.chat.completions.create(model=WORKSHOP_MODEL, stream=True, max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": "Say hello"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip()
    wrong = openai.OpenAI(base_url=keyed_server.url_for("v1"), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=WORKSHOP_MODEL, max_tokens=2,
                                      messages=[{"role": "user", "content": "hi"}])


def test_anthropic_docs_request_with_x_api_key_gets_an_answer(keyed_server):
    """The request of Anthropic's docs (`curl .../v1/messages -H "x-api-key: $KEY" -H "anthropic-version: ..."`),
    with the `--api-key` key and with a keys-file key."""
    url = keyed_server.url + WORKSHOP_ROOT_PATH + "/v1/messages"
    body = {"model": WORKSHOP_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Say hello"}]}
    headers = {"anthropic-version": "2023-06-01"}
    refused = httpx.post(url, json=body, headers={**headers, "x-api-key": "wrong"}, timeout=60)
    assert refused.status_code == 401 and "x-api-key" in error_of(refused)["message"]
    for key in (WORKSHOP_KEY, keyed_server.keys["student-1"]):
        response = httpx.post(url, json=body, headers={**headers, "x-api-key": key}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["type"] == "message" and response.json()["usage"]["output_tokens"] >= 1


def test_health_stays_open_and_reports_the_flags(keyed_server):
    body = httpx.get(keyed_server.url + WORKSHOP_ROOT_PATH + "/health", timeout=10).json()
    assert body["status"] == "healthy"
    assert body["model"] == WORKSHOP_MODEL
    assert body["max_model_len"] == WORKSHOP_MAX_MODEL_LEN  # the flag beat our CPU default (4096)


def test_max_model_len_flag_bounds_the_prompt(keyed_server):
    auth = {"Authorization": f"Bearer {WORKSHOP_KEY}"}
    response = httpx.post(keyed_server.url_for("v1", "completions"), headers=auth, timeout=60,
                          json={"model": WORKSHOP_MODEL, "prompt": "hello " * 1500, "max_tokens": 2})
    assert response.status_code == 400
    assert str(WORKSHOP_MAX_MODEL_LEN) in error_of(response)["message"]
