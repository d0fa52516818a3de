"""The relay a learner copies (relay/relay.py), as a real process in front of a real vLLM server: its stream, its
users and key, its refusals, keep-alives and disconnects. No mock of the relay or of vLLM."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_checks import WORKSHOP_KEY, metrics, wait_for
from test_disconnect import ABORT_DEADLINE, LONG, Engine, check_abort, serves_others

from streaming_tutorial.client.metrics import metric
from streaming_tutorial.client.relay_stream import relay_events
from streaming_tutorial.processes.local_server import free_port
from streaming_tutorial.processes.relay import RELAY_SCRIPT, Relay

USERS = ["alice-token", "bob-token"]
RELAY_MAX_TOKENS = 64  # the relay's own cap (--max-tokens), far below the server's
RELAY_MAX_BODY = 32 * 1024  # above the longest prompt here (a context's worth of words, about 25 KB)
HELLO = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def relay(server):
    with Relay(server.url, USERS, ["--max-tokens", str(RELAY_MAX_TOKENS), "--max-body", str(RELAY_MAX_BODY),
                                   "--keepalive", "0.2"]) as running:
        yield running


def chat(relay: Relay, body: dict, headers: dict | None = None) -> tuple[httpx.Response, list[dict]]:
    with httpx.stream("POST", relay.url_for("chat"), json=body, headers=headers or relay.headers,
                      timeout=httpx.Timeout(120, connect=10)) as response:
        body = response.read()
        return response, relay_events(body) if response.status_code == 200 else []


def test_a_chat_streams_tokens_then_exactly_one_done_and_every_event_names_its_stream_and_place(relay):
    response, events = chat(relay, HELLO)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
    named = [event for event in events if "event" in event]
    assert [e["event"] for e in named[:-1]] == ["token"] * (len(named) - 1) and named[-1]["event"] == "done"
    stream_ids = {event["id"].split(":")[0] for event in named}
    assert len(stream_ids) == 1, stream_ids
    assert [int(event["id"].split(":")[1]) for event in named] == list(range(1, len(named) + 1))
    done = named[-1]["data"]
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] <= HELLO["max_tokens"]
    assert "".join(event["data"]["text"] for event in named[:-1]).strip()


def test_two_streams_get_two_stream_ids(relay):
    ids = {chat(relay, HELLO)[1][-1]["id"].split(":")[0] for _ in range(2)}
    assert len(ids) == 2


def test_each_user_has_a_token_of_their_own_and_others_are_refused(relay):
    assert chat(relay, HELLO, {"Authorization": f"Bearer {USERS[1]}"})[0].status_code == 200
    for headers in ({}, {"Authorization": "Bearer not-a-user"}, {"Authorization": USERS[0]}):
        response = httpx.post(relay.url_for("chat"), json=HELLO, headers=headers, timeout=30)
        assert response.status_code == 401 and "relay token" in response.json()["error"]["message"]


def prompt_tokens(server) -> float:
    return metric(metrics(server.url), "vllm:prompt_tokens_total")


@pytest.mark.parametrize("body, status, words", [
    (b'{"messages": [', 422, "JSON"),
    (b'{"max_tokens": 5}', 422, "messages"),
    (b'{"messages": []}', 422, "messages"),
    (json.dumps({**HELLO, "max_tokens": RELAY_MAX_TOKENS + 1}).encode(), 422, f"at most {RELAY_MAX_TOKENS}"),
    (json.dumps({**HELLO, "model": "gpt-4"}).encode(), 422, "model"),
    (json.dumps({**HELLO, "pad": "x" * RELAY_MAX_BODY}).encode(), 413, f"over {RELAY_MAX_BODY} bytes"),
])
def test_bad_input_gets_a_clear_4xx_and_nothing_reaches_vllm(relay, server, body, status, words):
    before = prompt_tokens(server)
    response = httpx.post(relay.url_for("chat"), content=body, timeout=30,
                          headers={**relay.headers, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]
    assert prompt_tokens(server) == before
    assert chat(relay, HELLO)[0].status_code == 200  # and the relay goes on serving


def test_a_refusal_before_the_stream_began_is_handed_on_with_vllms_status_and_words(relay, model_name, client):
    limit = client.models.list().data[0].model_extra["max_model_len"]
    words = " ".join(random.Random(1).choice(["apple", "river", "stone", "cloud"]) for _ in range(limit + 50))
    response = httpx.post(relay.url_for("chat"), headers=relay.headers, timeout=60,
                          json={"messages": [{"role": "user", "content": words}], "max_tokens": 8})
    assert response.status_code == 400, response.text
    assert "context length" in response.json()["error"]["message"] or "maximum" in response.json()["error"]["message"]


def test_keep_alive_comments_go_out_while_vllm_reads_a_long_prompt(relay):
    """Before the first token vLLM sends nothing: the relay's `: keep-alive` comments (every 0.2 s here) fill the
    silence that a proxy's idle timeout would otherwise cut."""
    words = " ".join(random.Random(2).choice(["apple", "river", "stone", "cloud"]) for _ in range(1500))
    _, events = chat(relay, {"messages": [{"role": "user", "content": words}], "max_tokens": 4})
    first_token = next(i for i, event in enumerate(events) if event.get("event") == "token")
    assert {"comment": "keep-alive"} in events[:first_token], events[:first_token + 1]
    assert events[-1]["event"] == "done"


def test_the_relay_holds_the_vllm_key_and_no_client_of_it_ever_sees_it(keyed_server):
    with Relay(keyed_server.url, USERS, vllm_api_key=WORKSHOP_KEY, name="relay-keyed") as keyed:
        response = httpx.post(keyed.url_for("chat"), headers=keyed.headers, timeout=60,
                              json={**HELLO, "max_tokens": 4})
        assert response.status_code == 200 and "event: done" in response.text
        assert WORKSHOP_KEY not in response.text and WORKSHOP_KEY not in str(response.headers)
        assert WORKSHOP_KEY not in httpx.get(keyed.url_for("health"), timeout=10).text
    with Relay(keyed_server.url, USERS, vllm_api_key="a-wrong-key", name="relay-wrong-key") as wrong:
        response = httpx.post(wrong.url_for("chat"), headers=wrong.headers, json=HELLO, timeout=60)
        assert response.status_code == 502 and "VLLM_API_KEY" in response.json()["error"]["message"]


def test_a_browser_that_goes_away_stops_the_generation_in_vllm(server, model_name):
    """When a stream's last client goes away, the relay cancels the task that reads vLLM (at once: no
    --resume-grace), and vLLM aborts the request (the same proof as tests/test_disconnect.py: vLLM's /metrics)."""
    with Relay(server.url, USERS, ["--extra-body", json.dumps({"ignore_eos": True})], name="relay-long") as relay:
        def open_stream():
            response = httpx.stream("POST", relay.url_for("chat"), headers=relay.headers, timeout=60, json={
                "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": LONG["max_tokens"]})
            opened = response.__enter__()
            lines = opened.iter_lines()
            wait_for(lambda: next(lines).startswith("event: token"), 60, interval=0, what="a token event")
            return opened

        check_abort(server, open_stream, lambda response: response.close())
    serves_others(server, model_name)


def test_health_says_when_the_model_server_is_away_and_chat_answers_502():
    relay = Relay(f"http://127.0.0.1:{free_port()}", USERS, name="relay-no-upstream")
    relay.launch()
    try:
        answer = wait_for(lambda: _get(relay.url_for("health")), 60, what="the relay to answer /health")
        assert answer.status_code == 503 and answer.json()["upstream"]["ok"] is False
        response = httpx.post(relay.url_for("chat"), headers=relay.headers, json=HELLO, timeout=30)
        assert response.status_code == 502 and "unreachable" in response.json()["error"]["message"]
    finally:
        relay.stop()
    assert not relay.process_tree()


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def test_the_relay_on_a_taken_port_is_a_one_line_error(server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(RELAY_SCRIPT), "--port", str(port), "--upstream", server.url],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "RELAY_TOKEN": "x"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_the_relays_page_shows_a_refusal_in_words(relay, browser):
    """The page asks for 200 tokens unless told otherwise; this relay's cap is RELAY_MAX_TOKENS: the page says what
    the relay said."""
    page = browser.new_page()
    page.goto(relay.url)
    page.fill("#token", USERS[0])
    page.click("#send")
    page.wait_for_selector("body[data-ended]", timeout=60_000)
    assert page.get_attribute("body", "data-ended") == "refused"
    assert f"at most {RELAY_MAX_TOKENS}" in page.text_content("#status")
    page.close()


def test_the_relays_page_reads_a_stream_to_done_and_its_stop_button_stops_vllm(server, browser):
    """The page of notebook 09 in a real Chromium: `fetch` and a stream reader show the answer and its `done`;
    Stop aborts the fetch, the relay's response is cancelled, and vLLM aborts the request (its /metrics)."""
    with Relay(server.url, USERS, ["--extra-body", json.dumps({"ignore_eos": True})], name="relay-page") as relay:
        page = browser.new_page()
        page.goto(relay.url)
        page.fill("#token", USERS[1])
        page.fill("#prompt", "Say hello.")
        page.fill("#max_tokens", "24")
        page.click("#send")
        page.wait_for_selector("body[data-ended]", timeout=120_000)
        assert page.get_attribute("body", "data-ended") == "done", page.text_content("#status")
        assert page.text_content("#answer").strip() and "24 tokens" in page.text_content("#status")
        page.fill("#max_tokens", str(LONG["max_tokens"]))

        def open_stream():
            page.click("#send")
            page.wait_for_function("document.getElementById('answer').textContent.length > 0", timeout=60_000)
            return page

        check_abort(server, open_stream, lambda page: page.click("#stop"))
        page.wait_for_selector("body[data-ended='stopped']", timeout=10_000)
        page.close()


# ---- picking a stream up again (GET /chat/resume) ----

def read_until(relay: Relay, body: dict, last: int, headers: dict | None = None) -> list[dict]:
    """The stream's first `last` events, then the connection is closed, as a train's tunnel closes it."""
    events, current = [], {}
    with httpx.stream("POST", relay.url_for("chat"), json=body, headers=headers or relay.headers,
                      timeout=httpx.Timeout(120, connect=10)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith(("event: ", "data: ", "id: ")):
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else value
            elif not line and "id" in current:
                events.append(current)
                current = {}
                if len(events) == last:
                    break
    return events


def resume(relay: Relay, last_event_id: str, headers: dict | None = None, in_query: bool = False) -> httpx.Response:
    """GET /chat/resume, read to its end; the id in the Last-Event-ID header (or ?last_event_id=)."""
    params = {"last_event_id": last_event_id} if in_query else None
    with httpx.stream("GET", relay.url_for("chat", "resume"), params=params, timeout=120, headers={
            **(headers or relay.headers), **({} if in_query else {"Last-Event-ID": last_event_id})}) as response:
        response.read()
    return response


def numbers(events: list[dict]) -> list[int]:
    return [int(event["id"].split(":")[1]) for event in events]


@pytest.fixture(scope="module")
def resumable(server):
    with Relay(server.url, USERS, ["--resume-grace", "30", "--extra-body", json.dumps({"ignore_eos": True})],
               name="relay-resumable") as running:
        yield running


def test_a_dropped_stream_picks_up_from_the_next_event_with_no_gap_and_no_repeat(resumable):
    body = {"messages": [{"role": "user", "content": "Count the stars."}], "max_tokens": 24, "temperature": 0}
    before = read_until(resumable, body, 5)
    stream_id = before[-1]["id"].split(":")[0]
    for in_query in (False, True):
        rest = [e for e in relay_events(resume(resumable, before[-1]["id"], in_query=in_query).content) if "id" in e]
        assert numbers(before + rest) == list(range(1, len(before) + len(rest) + 1))
        assert {event["id"].split(":")[0] for event in rest} == {stream_id}
        assert rest[-1]["event"] == "done" and rest[-1]["data"]["usage"]["completion_tokens"] == 24
    everything = [e for e in relay_events(resume(resumable, f"{stream_id}:0").content) if "id" in e]
    assert everything[:5] == before and everything[5:] == rest  # the same events, kept: the same answer


def test_a_last_event_id_that_is_malformed_unknown_too_far_or_another_users_is_refused_before_vllm(resumable, server):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    theirs = read_until(resumable, body, 2)[-1]["id"]
    stream_id = theirs.split(":")[0]
    before = prompt_tokens(server)
    for last_event_id, headers, status, words in [
        ("no-colon", None, 400, "Last-Event-ID"),
        (f"{stream_id}:x", None, 400, "Last-Event-ID"),
        ("0123456789ab:1", None, 404, "no stream 0123456789ab"),
        (f"{stream_id}:999", None, 400, "not 999"),
        (theirs, {"Authorization": f"Bearer {USERS[1]}"}, 404, f"no stream {stream_id}"),  # Bob reads Alice's: no
        (theirs, {"Authorization": "Bearer not-a-user"}, 401, "relay token"),
    ]:
        response = resume(resumable, last_event_id, headers)
        assert response.status_code == status, (last_event_id, response.text)
        assert words in response.json()["error"]["message"]
    assert prompt_tokens(server) == before


def test_with_nobody_listening_the_generation_stops_after_the_grace_period_and_a_resume_says_so(server):
    """--resume-grace 2: the request keeps running in vLLM for the grace period after the drop (a client may come
    back), then the relay closes it and vLLM aborts it; a later resume replays the events and a final error."""
    engine = Engine(server)
    before = engine.idle()
    with Relay(server.url, USERS, ["--resume-grace", "2", "--extra-body", json.dumps({"ignore_eos": True})],
               name="relay-grace") as relay:
        body = {"messages": [{"role": "user", "content": "A long story."}], "max_tokens": LONG["max_tokens"]}
        last = read_until(relay, body, 3)[-1]["id"]
        dropped = time.monotonic()
        assert engine.sample()["running"] >= 1  # still generating for nobody: the grace period
        wait_for(lambda: engine.sample()["running"] == 0, 2 + ABORT_DEADLINE + 3, interval=0.05,
                 what="the request to stop after the grace period")
        stopped_after = time.monotonic() - dropped
        after = engine.stopped_generating()
        print(f"\nthe request stopped {stopped_after:.1f} s after the drop (grace 2 s)")
        assert stopped_after >= 2 - 0.1, "the request stopped before the grace period ended"
        assert after["finished"] == before["finished"], "the request finished instead of being stopped"
        rest = [event for event in relay_events(resume(relay, last).content) if "id" in event]
        assert rest[-1]["event"] == "error" and "no client was listening" in rest[-1]["data"]["message"]
        assert numbers(rest) == list(range(int(last.split(":")[1]) + 1, numbers(rest)[-1] + 1))
