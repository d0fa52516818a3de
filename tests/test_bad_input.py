"""Bad requests get a 4xx in vLLM's error shape {"error": {"message", "type", "param", "code"}}, never a 5xx
or a hang, and the server stays healthy. A table of hand-picked cases, then hypothesis-generated requests."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_checks import error_of

from streaming_tutorial.client.sse import DONE
from streaming_tutorial.server.security import DEFAULT_MAX_BODY_BYTES

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = {"Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]
M = "{model}"  # filled in with the served model's name


def raw(text: str) -> bytes:
    return text.replace(M, "MODEL").encode()


NESTED = b"[" * 100_000 + b"]" * 100_000

# name: (path, body: dict (sent as JSON) or bytes (sent as is), extra headers, expected status, expected param)
CASES = {
    "malformed JSON": (CHAT, b'{"model": "MODEL", "messages": [', JSON, 400, None),
    "wrong content type (text/plain)": (CHAT, b'{"model": "MODEL", "messages": []}', {"Content-Type": "text/plain"},
                                        400, None),
    "no content type": (CHAT, b'{"model": "MODEL", "messages": []}', {}, 400, None),
    "empty body": (CHAT, b"", JSON, 400, None),
    "JSON array instead of object": (CHAT, b"[1, 2]", JSON, 400, None),
    "missing messages": (CHAT, {"model": M}, {}, 400, "body.messages"),
    "messages not a list": (CHAT, {"model": M, "messages": "hi"}, {}, 400, None),
    "missing prompt": (COMPLETIONS, {"model": M}, {}, 400, "prompt"),
    "unknown model": (CHAT, {"model": "no-such-model", "messages": HI}, {}, 404, "model"),
    "negative max_tokens": (CHAT, {"model": M, "messages": HI, "max_tokens": -5}, {}, 400, "max_tokens"),
    "zero max_tokens": (COMPLETIONS, {"model": M, "prompt": "hi", "max_tokens": 0}, {}, 400, "max_tokens"),
    "huge max_tokens": (CHAT, {"model": M, "messages": HI, "max_tokens": 10**12}, {}, 400, "max_tokens"),
    "max_tokens beyond int64": (COMPLETIONS, {"model": M, "prompt": "hi", "max_tokens": 10**30}, {}, 400, None),
    "max_tokens a string": (CHAT, {"model": M, "messages": HI, "max_tokens": "lots"}, {}, 400, None),
    "prompt longer than the context (chat)": (CHAT, {"model": M, "messages": [
        {"role": "user", "content": "hello " * 5000}], "max_tokens": 4}, {}, 400, None),
    "prompt longer than the context (completions)": (COMPLETIONS, {"model": M, "prompt": "hello " * 5000,
                                                                  "max_tokens": 4}, {}, 400, None),
    "negative temperature": (CHAT, {"model": M, "messages": HI, "temperature": -1}, {}, 400, "temperature"),
    "temperature a string": (CHAT, {"model": M, "messages": HI, "temperature": "hot"}, {}, 400, None),
    "temperature NaN": (CHAT, b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], '
                              b'"max_tokens": 2, "temperature": NaN}', JSON, 400, "temperature"),
    "top_p above 1": (CHAT, {"model": M, "messages": HI, "max_tokens": 2, "top_p": 2}, {}, 400, None),
    "n = 0": (CHAT, {"model": M, "messages": HI, "max_tokens": 2, "n": 0}, {}, 400, None),
    "stream_options without stream": (CHAT, {"model": M, "messages": HI, "max_tokens": 2,
                                             "stream_options": {"include_usage": True}}, {}, 400, "stream_options"),
    "invalid UTF-8": (CHAT, b'{"model": "MODEL", "messages": [{"role": "user", "content": "\xff\xfe"}]}', JSON,
                      400, None),
    "lone UTF-16 surrogate": (COMPLETIONS, b'{"model": "MODEL", "prompt": "a\\ud800b", "max_tokens": 2}', JSON,
                              400, None),
    # 200 KB of `[[[[...]]]]`: Python's JSON parser gives up on it (RecursionError), on any route.
    "deeply nested JSON": (CHAT, NESTED, JSON, 400, None),
    "deeply nested JSON in a field": (CHAT, b'{"model": "MODEL", "messages": ' + NESTED + b"}", JSON, 400, None),
    "deeply nested JSON (Messages API)": ("/v1/messages", NESTED, JSON, 400, None),
    "deeply nested JSON (a route without limits)": ("/tokenize", NESTED, JSON, 400, None),
    "oversized body (declared length)": (CHAT, {"model": M, "messages": [
        {"role": "user", "content": "a" * (DEFAULT_MAX_BODY_BYTES + 1)}]}, {}, 413, None),
    "oversized body (chunked, no length)": (CHAT, "chunked", {}, 413, None),
}


def send(http, model: str, path: str, body, headers: dict) -> httpx.Response:
    if body == "chunked":
        def chunks():  # 1 MiB pieces, more than the limit in all, with no Content-Length
            yield b'{"model": "%s", "messages": [{"role": "user", "content": "' % model.encode()
            for _ in range(DEFAULT_MAX_BODY_BYTES // (1 << 20) + 2):
                yield b"a" * (1 << 20)
            yield b'"}]}'
        return http.post(path, content=chunks(), headers=JSON)
    if isinstance(body, bytes):
        return http.post(path, content=body.replace(b"MODEL", model.encode()), headers=headers)
    body = json.loads(json.dumps(body).replace(json.dumps(M)[1:-1], model))
    return http.post(path, json=body, headers=headers)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_4xx_in_vllm_error_shape(http, model_name, name):
    path, body, headers, status, param = CASES[name]
    start = time.perf_counter()
    response = send(http, model_name, path, body, headers)
    elapsed = time.perf_counter() - start
    error = error_of(response)
    print(f"\n{name}: {response.status_code} in {elapsed:.2f} s: {error['message'][:120]!r}")
    assert response.status_code == status, response.text[:500]
    assert error["code"] == status
    if param:
        assert error["param"] == param
    assert elapsed < 10
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/v1/messages", "/v1/responses"])
def test_deeply_nested_json_is_a_400_that_says_so(http, path):
    response = http.post(path, content=NESTED, headers=JSON)
    assert response.status_code == 400, response.text[:300]
    assert "nested too deeply" in error_of(response)["message"]


def test_nested_json_in_a_message_is_a_4xx_at_any_depth(http, model_name):
    """Below, near and at the depth where Python's parser gives up (its recursion limit, 1000 by default): the
    middleware's parse, FastAPI's second parse, pydantic and the chat template each see the body, none may 500."""
    for levels in (64, 500, 950, 2000):
        content = ("[" * levels + "]" * levels).encode()
        body = b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]}' % (
            model_name.encode(), content)
        response = http.post(CHAT, content=body, headers=JSON)
        print(f"\n{levels} levels: {response.status_code} {error_of(response)['message'][:100]!r}")
        assert 400 <= response.status_code < 500, (levels, response.text[:300])
    assert http.get("/health").status_code == 200


def test_unknown_route_and_method_use_the_error_shape_too(http):
    assert error_of(response := http.get("/v1/no-such-route"))["code"] == 404 == response.status_code
    assert error_of(response := http.get(CHAT))["code"] == 405 == response.status_code


# ---- property-based: requests generated from the chat request schema, valid and invalid fields mixed ----

MAX_EXAMPLES = 80

texts = st.text(max_size=40)
anything = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False), texts,
                     st.lists(st.integers(0, 5), max_size=3))
roles = st.sampled_from(["system", "user", "assistant", "user", "user"])
valid_message = st.fixed_dictionaries({"role": roles, "content": texts})
any_message = st.fixed_dictionaries({"role": st.one_of(roles, texts),
                                     "content": st.one_of(texts, st.none(), st.integers(), anything)},
                                    optional={"name": texts, "tool_calls": anything})
# Each field of the chat schema: (valid values, values that include invalid ones).
FIELDS = {
    "temperature": (st.floats(0, 2), st.one_of(st.floats(-5, 5), st.just("hot"), st.just(float("inf")))),
    "top_p": (st.floats(0.01, 1), st.floats(-1, 3)),
    "top_k": (st.integers(-1, 50), st.integers(-5, 10**6)),
    "n": (st.integers(1, 2), st.integers(-1, 3)),
    "seed": (st.integers(0, 2**31), st.integers(-(2**70), 2**70)),
    "stop": (st.one_of(st.text(min_size=1, max_size=10), st.lists(st.text(min_size=1, max_size=10), max_size=3)),
             anything),
    "stream": (st.booleans(), anything),
    "stream_options": (st.just({"include_usage": True}), st.one_of(st.fixed_dictionaries(
        {"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}), anything)),
    "presence_penalty": (st.floats(-2, 2), st.floats(-5, 5)),
    "frequency_penalty": (st.floats(-2, 2), st.floats(-5, 5)),
    "repetition_penalty": (st.floats(0.5, 2), st.floats(-1, 3)),
    "logprobs": (st.booleans(), anything),
    "top_logprobs": (st.integers(0, 5), st.integers(-1, 10**4)),
    "min_tokens": (st.integers(0, 1), st.integers(-1, 10**4)),
    "ignore_eos": (st.booleans(), anything),
    "return_token_ids": (st.booleans(), anything),
    "user": (texts, anything),
    "response_format": (st.just({"type": "text"}), st.one_of(st.just({"type": "nonsense"}), anything)),
    "tools": (st.just([{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]),
              st.one_of(st.just([]), anything)),
    "no_such_field": (anything, anything),
}
# Always bounded, so every request that reaches the engine stays short (unset means up to the context).
SHORT = st.integers(1, 8)


def valid_chat_request():
    return st.fixed_dictionaries(
        {"model": st.just(M), "messages": st.lists(valid_message, min_size=1, max_size=3), "max_tokens": SHORT,
         "stream": st.sampled_from([True, True, False])},
        optional={name: valid for name, (valid, _) in FIELDS.items() if name != "stream"}).map(streamable)


def streamable(body: dict) -> dict:
    if body.get("stream") is not True:  # vLLM refuses stream_options without stream, by design (a table case)
        body.pop("stream_options", None)
    if not body.get("logprobs"):
        body.pop("top_logprobs", None)
    if "tools" in body:  # "none" works on any server; "auto" needs a tool-call parser (the bundled model has one)
        body["tool_choice"] = "none"
    return body


def mixed_chat_request():
    return st.fixed_dictionaries(
        {"model": st.sampled_from([M, M, M, "no-such-model", ""]),
         "messages": st.one_of(st.lists(any_message, min_size=1, max_size=3), st.just([]), anything),
         "max_tokens": st.one_of(SHORT, st.sampled_from([-1, 0, "8", 10**9, 2.5]))},
        optional={name: st.one_of(valid, invalid) for name, (valid, invalid) in FIELDS.items()})


# About half the requests are valid as a whole (a mixed one rarely is), so that many reach the engine.
chat_request = st.one_of(valid_chat_request(), mixed_chat_request())


def answer(http, model_name: str, request: dict) -> tuple[int, bool]:
    """Send one generated request; assert it is answered without a 5xx, in vLLM's error shape when refused, to
    `[DONE]` when streamed (the client timeout is the hang detector). Returns (status, streamed to [DONE])."""
    body = json.loads(json.dumps(request).replace(json.dumps(M)[1:-1], model_name))
    # Even n=2 x 8 tokens with logprobs answers in seconds. json.dumps writes Infinity/NaN as Python does
    # (httpx's json= refuses them): the server must cope.
    with http.stream("POST", CHAT, content=json.dumps(body), headers=JSON, timeout=60) as response:
        assert response.status_code < 500, (body, response.read())
        if response.status_code != 200:
            error_of(response.read() and response)
            return response.status_code, False
        if body.get("stream") is True:
            events = [line for line in response.iter_lines() if line.startswith("data:")]
            assert events and events[-1] == f"data: {DONE}", (body, events[-3:])
            return 200, True
        assert "choices" in json.loads(response.read())
        return 200, False


@pytest.fixture(scope="module")
def generated_outcomes(http, model_name) -> list[tuple[int, bool]]:
    """MAX_EXAMPLES generated chat requests, sent once for the tests below: (status, streamed to [DONE]) each.
    A request that breaks a rule of `answer` fails the fixture with hypothesis's smallest such request."""
    outcomes: list[tuple[int, bool]] = []

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(request=chat_request)
    def send_generated(request):
        outcomes.append(answer(http, model_name, request))

    send_generated()
    return outcomes


def test_generated_chat_requests_never_5xx_nor_hang(generated_outcomes):
    assert len(generated_outcomes) >= MAX_EXAMPLES, f"only {len(generated_outcomes)} requests were generated"
    assert all(status == 200 or 400 <= status < 500 for status, _ in generated_outcomes), generated_outcomes


def test_generated_requests_reached_the_engine_and_the_server_is_healthy(http, generated_outcomes):
    """Enough generated requests were valid to matter: the property above is not only about refusals."""
    ok = sum(status == 200 for status, _ in generated_outcomes)
    streamed = sum(done for _, done in generated_outcomes)
    statuses = sorted({status for status, _ in generated_outcomes})
    print(f"\n{len(generated_outcomes)} generated requests: {ok} answered 200 ({streamed} streamed to [DONE]); "
          f"statuses {statuses}")
    assert ok >= len(generated_outcomes) // 5
    assert streamed >= 5
    assert http.get("/health").json()["status"] == "healthy"
