"""The classroom page (`GET /`), driven in a real headless Chromium against a real server.

The browser is Playwright's own Chromium or the system's (`make browser` finds or installs one). Replies that
the model cannot be made to give (hostile text, a refused lane, a dead engine) are put in the browser's path
with `page.route`; everything else is the real server.

`make screenshot` (UPDATE_SCREENSHOTS=1) also saves the race view to docs/page-race.png for README, and the chat
mid-answer and a race of 16 lanes running and done at 1280x720 and at 1920x1080 to docs/page-<width>-*.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page
from server_checks import WORKSHOP_KEY, WORKSHOP_MODEL, WORKSHOP_ROOT_PATH, wait_for
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from streaming_tutorial.client.metrics import metric
from streaming_tutorial.client.sse import DONE, sse_events
from streaming_tutorial.server.app import create_app
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.page import STATIC_DIR, race

DOCS = Path(__file__).resolve().parent.parent / "docs"
SCREENSHOT = DOCS / "page-race.png"
UPDATE_SCREENSHOTS = os.environ.get("UPDATE_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1280, "height": 720}  # a projector
VIEWPORTS = [VIEWPORT, {"width": 1920, "height": 1080}]  # and a projector's other usual size
ANSWER = "#messages li.assistant:last-child"
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def new_tab(browser, viewport: dict = VIEWPORT) -> Page:
    """A fresh tab that records every request it makes (`requests`), those that finished (`finished`), and every
    console error (`errors`)."""
    tab = browser.new_context(viewport=viewport).new_page()
    tab.requests, tab.finished, tab.errors = [], [], []
    tab.on("request", lambda request: tab.requests.append(request))
    tab.on("requestfinished", lambda request: tab.finished.append(request))
    tab.on("console", lambda message: message.type == "error" and tab.errors.append(message.text))
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    return tab


@pytest.fixture
def page(browser):
    """A fresh tab at 1280x720 (see `new_tab`)."""
    tab = new_tab(browser)
    yield tab
    tab.context.close()


def open_page(page: Page, url: str, tab: str = "") -> None:
    """Open the page and wait until it knows the server (panel) and the model (v1/models)."""
    page.goto(url + "/" + tab)
    page.wait_for_selector("#status[data-state=healthy]", timeout=30_000)


def settings(page: Page, prefix: str, temperature: float, max_tokens: int) -> None:
    page.fill(f"#{prefix}-temperature", str(temperature))
    page.fill(f"#{prefix}-max-tokens", str(max_tokens))


def start_race(page: Page, url: str, prompt: str, lanes: int, temperature: float, max_tokens: int,
               key: str | None = None) -> None:
    open_page(page, url, "#race")
    if key:
        page.fill("#key-input", key)
        page.click("#key button:has-text('Use this key')")
        page.wait_for_selector("#key", state="hidden")
    page.fill("#race-prompts", prompt)
    page.fill("#race-n", str(lanes))
    settings(page, "race", temperature, max_tokens)
    page.click("#race-start")


def answer(page: Page) -> dict:
    """The last answer of the chat: its state, text, figures and error line."""
    return page.eval_on_selector(ANSWER, """item => ({state: item.dataset.state,
        text: item.querySelector('.text').textContent, tokens: item.dataset.tokens, finish: item.dataset.finish,
        paintedMs: Number(item.dataset.paintedMs), error: item.querySelector('.error')?.textContent ?? null})""")


def ask(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def wait_until_answered(page: Page, timeout: float = 120) -> dict:
    return wait_for(lambda: (a := answer(page))["state"] not in ("waiting", "streaming") and a,
                    timeout, what="the answer to end")


def running(server) -> float:
    return metric(httpx.get(server.url_for("metrics"), timeout=10).text, "vllm:num_requests_running")


def sse_body(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def chunk(content: str | None = None, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}


def poll_in_page(page: Page, condition, timeout: float, what: str):
    """`wait_for`, waiting in the browser: Playwright hands over the page's events (`requestfinished`) meanwhile."""
    return wait_for(condition, timeout, what=what, pause=lambda seconds: page.wait_for_timeout(seconds * 1000))


def lane_tokens(page: Page) -> list[int]:
    return [int(tokens) for tokens in page.eval_on_selector_all(
        "#lanes .lane", "items => items.map(item => item.dataset.tokens ?? 0)")]


def check_race_total(page: Page) -> dict:
    """The race's final total against its lanes: all their tokens over the race's wall time, from its request sent
    to its last lane's end, here the browser's own timing of the race's request (its last byte is the [DONE]
    after the last lane's end). Returns the figures, for the report."""
    race = poll_in_page(page, lambda: [r for r in page.finished if r.url.endswith("/page/race")], 10,
                        "the race's request to finish")[-1]
    seconds = race.timing["responseEnd"] / 1000
    tokens = sum(lane_tokens(page))
    shown = float(page.text_content("#race-rate").replace(",", ""))
    assert tokens > 0 and seconds > 0
    assert shown == pytest.approx(tokens / seconds, rel=0.05), (shown, tokens, seconds)
    assert page.text_content("#race-sum").startswith(f" · {tokens:,} tokens in "), page.text_content("#race-sum")
    return {"shown": shown, "tokens": tokens, "seconds": round(seconds, 2)}


# The smallest computed font size of the visible text under `root`, as a share of the window's height.
SMALLEST_TEXT = """root => {
    const sizes = [], walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
        const element = walker.currentNode.parentElement, box = element.getBoundingClientRect();
        if (walker.currentNode.textContent.trim() && box.width && box.height && element.checkVisibility())
            sizes.push(parseFloat(getComputedStyle(element).fontSize));
    }
    return sizes.length ? Math.min(...sizes) / innerHeight : null;
}"""

# Each lane: header parts wider than their box, its finish reason and whether it shows whole, how much of its
# text's top line is cut, how far its text is from the end, and how far the text box runs past its lane.
LANES_AS_SHOWN = """items => new Promise(done => requestAnimationFrame(() => done(items.map(item => {
    const head = item.querySelector('.lane-head'), finish = item.querySelector('.finish');
    const body = item.querySelector('.text'), clip = item.querySelector('.clip');
    const line = parseFloat(getComputedStyle(body).lineHeight), top = body.scrollTop % line;
    const lane = item.getBoundingClientRect(), shown = finish.getBoundingClientRect();
    return {
        cut: [head, ...head.children].filter(e => e.scrollWidth > e.clientWidth).map(e => e.textContent),
        finish: finish.textContent,
        finishShown: shown.width > 0 && shown.left >= lane.left && shown.right <= lane.right + 0.5
            && shown.bottom <= lane.bottom + 0.5,
        topLineCut: Math.min(top, line - top),
        fromEnd: body.scrollHeight - body.clientHeight - body.scrollTop,
        pastLane: body.getBoundingClientRect().bottom - clip.getBoundingClientRect().bottom,
    };
}))))"""  # read in the next frame, after the page's own update of it: what the screen shows


def check_lanes(page: Page, finished: bool) -> None:
    """Every lane shows its latest lines whole (none cut at the top, the end in view) and its header whole; once
    the race is over, its finish reason too."""
    for i, lane in enumerate(page.eval_on_selector_all("#lanes .lane", LANES_AS_SHOWN), 1):
        assert not lane["cut"], (i, lane)
        assert lane["topLineCut"] < 1.5 and lane["fromEnd"] < 1.5 and lane["pastLane"] < 0.5, (i, lane)
        if finished:
            assert lane["finish"] in ("stop", "length") and lane["finishShown"], (i, lane)


def screenshot(page: Page, name: str) -> None:
    if UPDATE_SCREENSHOTS:
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=DOCS / name)


def panel_figures(page: Page) -> tuple[str, str]:
    """The panel's "running" and "generating", read together (the panel writes both at once)."""
    return tuple(page.evaluate("['s-running', 's-gen'].map(id => document.getElementById(id).textContent)"))


# ---- served by the real server: chat, stop, race, key, origins, latency ----

@pytest.mark.server
def test_chat_paints_the_answer_as_it_streams_and_ends_with_the_greedy_answer(server, page, model_name):
    open_page(page, server.url)
    settings(page, "chat", 0, 64)
    ask(page, "Write a short poem about the sea.")
    lengths, running_seen, deadline = [], 0, time.monotonic() + 120
    while (sample := answer(page))["state"] in ("waiting", "streaming"):
        lengths.append(len(sample["text"]))
        running_seen = max(running_seen, int(page.text_content("#s-running").strip("–") or 0))
        assert time.monotonic() < deadline, "the answer did not end within 120 s"
        page.wait_for_timeout(10)  # the sampling interval
    final = answer(page)
    assert final["state"] == "done", final
    assert len(set(lengths) - {0}) >= 5, f"the text grew over too few lengths: {sorted(set(lengths))}"
    assert lengths == sorted(lengths), "the text only ever grows"
    assert running_seen == 1, "the server panel showed the running request"

    greedy = httpx.post(server.url_for("v1", "chat", "completions"), timeout=120, json={
        "model": model_name, "temperature": 0, "max_tokens": 64,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Write a short poem about the sea."}]}).json()
    assert final["text"] == greedy["choices"][0]["message"]["content"]
    assert final["tokens"] == str(greedy["usage"]["completion_tokens"])  # the figure comes from `usage`
    assert final["finish"] == greedy["choices"][0]["finish_reason"]
    assert page.text_content(f"{ANSWER} .figures").startswith("first token ")
    assert not page.errors


@pytest.mark.server
def test_stop_ends_the_generation_on_the_server_within_two_seconds(server, page):
    open_page(page, server.url)
    settings(page, "chat", 0.8, 1000)
    ask(page, "Write a very long story about a dragon who learns to cook.")
    wait_for(lambda: len(answer(page)["text"]) > 20, 120, what="the story to start")
    assert running(server) == 1
    page.click("#stop")
    stopped = time.monotonic()
    wait_for(lambda: running(server) == 0, 2, interval=0.05, what="vllm:num_requests_running to be back to 0")
    assert time.monotonic() - stopped < 2
    assert answer(page)["state"] == "stopped"
    assert answer(page)["finish"] == "stopped by you"


@pytest.mark.server
def test_a_race_of_eight_greedy_lanes_ends_with_eight_identical_answers_and_eight_series(server, page):
    start_race(page, server.url, "Name three colors and describe each in one sentence.", 8, 0, 64)
    most_running, deadline = 0, time.monotonic() + 180
    while page.get_attribute("#lanes", "data-state") != "finished":
        assert time.monotonic() < deadline, "the race did not end within 180 s"
        most_running = max(most_running, running(server))
        assert page.locator("#lanes .lane").count() == 8
        page.wait_for_timeout(100)  # a sampling interval for /metrics, not a wait for the race
    lanes = page.eval_on_selector_all("#lanes .lane", "items => items.map(item => "
                                      "({state: item.dataset.state, text: item.querySelector('.text').textContent}))")
    assert [lane["state"] for lane in lanes] == ["done"] * 8, lanes
    assert lanes[0]["text"].strip() and all(lane["text"] == lanes[0]["text"] for lane in lanes)
    assert page.locator("#race-chart polyline.series").count() == 8
    assert most_running == 8, "the engine ran the 8 lanes at once (continuous batching)"
    assert page.text_content("#race-done") == "8 of 8"
    check_race_total(page)
    screenshot(page, SCREENSHOT.name)


RACE_TOKENS = 64  # each lane's max_tokens in the race of 16: enough text to fill a lane, a race of seconds


def chat_and_race_of_16(server, page: Page, name: str) -> dict:
    """The chat mid-answer, then a race of 16 different greedy prompts, running and done, at this tab's size;
    screenshots `docs/{name}-*.png`. Returns the smallest text of each part as a share of the window height."""
    open_page(page, server.url)
    settings(page, "chat", 0, 200)
    ask(page, "Write a short poem about the sea.")
    wait_for(lambda: page.locator(f"{ANSWER} .figures").count() and (len(answer(page)["text"]) > 120
                                                                     or answer(page)["state"] != "streaming"),
             120, what="the chat's answer to be well under way")
    screenshot(page, f"{name}-chat.png")
    shares = {"panel": page.eval_on_selector("#server", SMALLEST_TEXT),
              "chat": page.eval_on_selector("#chat", SMALLEST_TEXT)}
    if answer(page)["state"] == "streaming":
        page.click("#stop")
    wait_for(lambda: running(server) == 0, 10, what="the chat's request to end")

    page.click("#tab-race")
    page.click("#race-examples")
    page.fill("#race-n", "16")
    settings(page, "race", 0, RACE_TOKENS)
    before = metric(httpx.get(server.url_for("metrics"), timeout=10).text, "vllm:generation_tokens_total")
    page.click("#race-start")
    readings, seen_running, deadline = [], False, time.monotonic() + 240
    while page.get_attribute("#lanes", "data-state") != "finished":
        assert time.monotonic() < deadline, "the race of 16 did not end within 240 s"
        readings.append(panel_figures(page))
        tokens = lane_tokens(page)
        if not seen_running and len(tokens) == 16 and min(tokens) > 0 and sum(tokens) >= 10 * 16 \
                and page.locator("#lanes .lane[data-state=streaming]").count():
            seen_running = True
            screenshot(page, f"{name}-race-running.png")
            shares["lanes running"] = page.eval_on_selector("#lanes", SMALLEST_TEXT)
            check_lanes(page, finished=False)
        page.wait_for_timeout(100)  # a sampling interval for the panel, not a wait for the race
    assert seen_running, "the race was never seen with every lane under way"
    assert page.text_content("#race-done") == "16 of 16"
    check_lanes(page, finished=True)
    total = check_race_total(page)
    after = metric(httpx.get(server.url_for("metrics"), timeout=10).text, "vllm:generation_tokens_total")
    assert after - before == total["tokens"], "the lanes' tokens are the tokens vLLM generated"
    screenshot(page, f"{name}-race.png")
    shares |= {"lanes done": page.eval_on_selector("#lanes", SMALLEST_TEXT),
               "race": page.eval_on_selector(".race-side", SMALLEST_TEXT)}
    # The panel's "generating" agrees with what runs: never 0.0 beside running requests, a rate while they run.
    assert not [r for r in readings if r[0] not in ("0", "–") and r[1] == "0.0 tok/s"], readings
    assert [r for r in readings if r[0] not in ("0", "–") and r[1] not in ("–", "0.0 tok/s")], readings
    poll_in_page(page, lambda: panel_figures(page) == ("0", "0.0 tok/s"), 10, "the panel to say nothing runs")
    print(f"\n{name}: race {total}; text as a share of the window height {shares}")
    assert not page.errors
    return shares


@pytest.mark.server
def test_at_1280x720_and_1920x1080_the_chat_and_a_race_of_16_read_alike(server, browser):
    """A projector shows 1280x720 or 1920x1080 on the same wall: every part's smallest text is at least as large
    a share of the window's height at 1920 as at 1280 (and at least 2 %: 14.4 px at 720), lanes show their latest
    lines and their finish reason whole, and the race's total is its lanes' tokens over its wall time."""
    shares = {}
    for viewport in VIEWPORTS:
        tab = new_tab(browser, viewport)
        try:
            shares[viewport["width"]] = chat_and_race_of_16(server, tab, f"page-{viewport['width']}")
        finally:
            tab.context.close()
    for part, share in shares[1280].items():
        assert share >= 0.02, (part, shares)
        assert shares[1920][part] >= share, (part, shares)


@pytest.mark.server
def test_stopping_a_race_ends_every_lane_on_the_server_within_two_seconds(server, page):
    start_race(page, server.url, "Write a very long story about a dragon who learns to cook.", 4, 0.8, 1000)
    wait_for(lambda: page.locator("#lanes .lane[data-state=streaming]").count() == 4 and running(server) == 4,
             120, what="the 4 lanes to stream")
    page.click("#race-stop")
    wait_for(lambda: running(server) == 0, 2, interval=0.05, what="vllm:num_requests_running to be back to 0")
    page.wait_for_selector("#lanes[data-state=finished]")
    assert page.eval_on_selector_all("#lanes .lane", "items => items.map(item => item.dataset.state)") \
        == ["stopped"] * 4


@pytest.mark.server
def test_a_keyed_server_asks_for_the_key_then_streams_with_it(keyed_server, page):
    url = keyed_server.url + WORKSHOP_ROOT_PATH  # also proves the page works under --root-path
    open_page(page, url)
    page.wait_for_selector("#key:visible")
    assert "this server needs an api key" in page.text_content("#key-message").lower()
    assert page.text_content("#s-model") == WORKSHOP_MODEL  # /health needs no key

    assert page.is_hidden("#key-forget"), "no key to forget yet"
    assert page.is_visible("#key-toggle")  # the server has asked for one: the header's button stays

    page.fill("#key-input", WORKSHOP_KEY)
    page.click("#key button:has-text('Use this key')")
    page.wait_for_selector("#key", state="hidden")
    assert page.evaluate("Object.values(sessionStorage)") == [WORKSHOP_KEY]
    page.click("#key-toggle")
    assert page.text_content("#key-message") == "A key is set for this tab."
    assert page.is_visible("#key-forget")
    page.click("#key-toggle")
    page.wait_for_selector("#key", state="hidden")
    settings(page, "chat", 0, 16)
    ask(page, "Say hello.")
    final = wait_until_answered(page)
    assert final["state"] == "done" and final["text"].strip(), final
    chat = [r for r in page.requests if r.url.endswith("/v1/chat/completions")]
    assert [r.url for r in chat] == [url + "/v1/chat/completions"]
    assert chat[0].headers["authorization"] == f"Bearer {WORKSHOP_KEY}"
    assert WORKSHOP_KEY not in page.content()


@pytest.mark.server
def test_the_key_form_offers_to_forget_a_key_only_when_one_is_set(keyed_server, page):
    url = keyed_server.url + WORKSHOP_ROOT_PATH
    open_page(page, url)
    page.wait_for_selector("#key:visible")
    assert page.is_hidden("#key-forget")
    page.click("#key button:has-text('Use this key')")  # nothing typed: no key is set
    assert page.evaluate("Object.values(sessionStorage)") == [] and page.is_hidden("#key-forget")

    page.fill("#key-input", "not-the-key")
    page.click("#key button:has-text('Use this key')")
    # Locators, not wait_for_function("..."): Playwright polls a string predicate with eval, which the page's
    # Content-Security-Policy (no 'unsafe-eval') refuses whenever the first check comes back false.
    page.locator("#key-message", has_text="did not accept").wait_for()
    assert page.is_visible("#key-forget")  # a wrong key is still a key to forget
    page.click("#key-forget")
    assert page.evaluate("Object.values(sessionStorage)") == []
    page.wait_for_selector("#key-forget", state="hidden")
    assert page.is_visible("#key-input") and page.is_visible("#key button:has-text('Use this key')")
    assert page.is_visible("#key-toggle")


@pytest.mark.server
def test_a_server_without_keys_shows_no_key_controls(server, page):
    open_page(page, server.url)
    page.wait_for_selector("#model option", state="attached")  # v1/models answered
    assert page.is_hidden("#key-toggle") and page.is_hidden("#key") and page.is_hidden("#key-forget")


def race_on_the_workshop_server(keyed_server, page, key: str, lanes: int) -> list[str]:
    """A race of `lanes` greedy lanes on the keyed workshop server with `key`; returns each lane's end state."""
    start_race(page, keyed_server.url + WORKSHOP_ROOT_PATH, "Name three colors.", lanes, 0, 48, key=key)
    page.wait_for_selector("#lanes[data-state=finished]", timeout=180_000)
    return page.eval_on_selector_all("#lanes .lane", "items => items.map(item => item.dataset.state)")


@pytest.mark.server
def test_a_students_race_runs_as_many_lanes_as_their_key_allows_and_says_why_for_the_rest(keyed_server, page):
    """The per-key limit (4 in flight by default) holds for the page's race too: each lane is a request."""
    states = race_on_the_workshop_server(keyed_server, page, keyed_server.keys["student-1"], 8)
    assert sorted(states) == ["done"] * 4 + ["refused"] * 4, states
    refused = page.locator("#lanes .lane[data-state=refused] .error").first.text_content()
    assert refused.startswith("HTTP 429: ") and "4 requests in flight" in refused, refused


@pytest.mark.server
def test_the_instructors_key_races_every_lane(keyed_server, page):
    """How an instructor runs the race on a keyed server: their keys-file line `instructor:<key>:16`."""
    lanes = keyed_server.settings["max_num_seqs"]  # as many as the workshop server runs at once
    assert race_on_the_workshop_server(keyed_server, page, keyed_server.keys["instructor"], lanes) \
        == ["done"] * lanes


@pytest.mark.server
def test_the_page_makes_no_request_to_any_other_origin(server, page):
    response = page.goto(server.url + "/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    page.wait_for_selector("#status[data-state=healthy]", timeout=30_000)
    settings(page, "chat", 0, 8)
    ask(page, "Say hello.")
    wait_until_answered(page)
    page.click("#tab-race")
    page.fill("#race-n", "2")
    settings(page, "race", 0, 8)
    page.click("#race-start")
    page.wait_for_selector("#lanes[data-state=finished]", timeout=120_000)
    urls = {request.url for request in page.requests}
    assert {server.url + path for path in ("/", "/page/app.js", "/page/style.css", "/v1/models",
                                           "/v1/chat/completions", "/page/race", "/health", "/metrics")} <= urls
    assert all(url.startswith(server.url + "/") for url in urls), urls
    assert not page.errors  # among them, any Content-Security-Policy violation


@pytest.mark.server
def test_the_pages_time_to_first_token_counts_from_send_and_is_printed_against_vllms(server, page):
    """Send -> first token in the page, against the TTFT vLLM reports (its histogram) for the same request.

    The page's figure includes the network and the browser, so it can never be below vLLM's. How much it adds is
    printed, not asserted: a timing goal on a busy 2-core machine would flake (docs/benchmarks.md has the
    figures). The screen shows the token at its next frame, so "painted" carries up to one frame more."""
    open_page(page, server.url)
    settings(page, "chat", 0, 4)
    shown, painted = [], []
    for i in range(7):
        page.click("#chat-new")
        before = httpx.get(server.url_for("metrics"), timeout=10).text
        ask(page, f"Count to {i + 3}.")
        page.wait_for_selector(f"{ANSWER}[data-state=done][data-painted-ms]", timeout=60_000)
        after = httpx.get(server.url_for("metrics"), timeout=10).text
        delta = {name: metric(after, name) - metric(before, name) for name in
                 ("vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count")}
        assert delta["vllm:time_to_first_token_seconds_count"] == 1
        api_ttft = 1000 * delta["vllm:time_to_first_token_seconds_sum"]
        times = page.eval_on_selector(ANSWER, "item => [Number(item.dataset.ttftMs), Number(item.dataset.paintedMs)]")
        shown.append(times[0] - api_ttft)
        painted.append(times[1] - api_ttft)
    print(f"\nthe page adds to vLLM's TTFT (ms): token in the page {[round(t, 1) for t in shown]}, "
          f"painted {[round(t, 1) for t in painted]}")
    print(f"medians: in the page +{statistics.median(shown):.1f} ms, painted +{statistics.median(painted):.1f} ms")
    assert min(shown) > 0 and all(p >= s for s, p in zip(shown, painted)), (shown, painted)


# ---- replies put in the browser's path: hostile text, refusals, a dead engine ----

@pytest.mark.server
def test_model_output_and_error_messages_are_shown_as_text_never_run_as_html(server, page):
    replies = iter([
        {"status": 200, "content_type": "text/event-stream",
         "body": sse_body(chunk(HOSTILE), chunk(finish="stop"))},
        {"status": 400, "content_type": "application/json",
         "body": json.dumps({"error": {"message": HOSTILE, "type": "BadRequestError", "code": 400}})},
    ])
    page.route("**/v1/chat/completions", lambda route: route.fulfill(**next(replies)))
    open_page(page, server.url)
    ask(page, "Hello")
    assert wait_until_answered(page)["text"] == HOSTILE
    ask(page, "Hello again")
    assert wait_until_answered(page)["error"] == f"HTTP 400: {HOSTILE}"
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("window.__pwned") is None


@pytest.mark.server
def test_a_refused_race_lane_says_why_in_one_line_and_the_others_run(server, page):
    refusal = {"error": {"message": "Too many requests in flight for this key.", "type": "RateLimitError",
                         "code": 429}}
    events = [{"lane": 0, "status": 200, "retry_after": None},
              {"lane": 1, "status": 429, "retry_after": "3"},
              {"lane": 1, "text": json.dumps(refusal)}, {"lane": 1, "end": True},
              {"lane": 0, "text": sse_body(chunk("Red, green, blue."), chunk(finish="stop"))},
              {"lane": 0, "end": True}]
    page.route("**/page/race", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse_body(*events)))
    open_page(page, server.url, "#race")
    page.fill("#race-n", "2")
    page.click("#race-start")
    page.wait_for_selector("#lanes[data-state=finished]")
    first, second = page.locator("#lanes .lane").all()
    assert first.get_attribute("data-state") == "done"
    assert first.locator(".text").text_content() == "Red, green, blue."
    assert second.get_attribute("data-state") == "refused"
    assert second.locator(".error").text_content() == \
        "HTTP 429: Too many requests in flight for this key. Retry after 3 s."


@pytest.mark.server
def test_the_panel_says_when_the_server_is_unreachable_or_its_engine_dead(server, page):
    open_page(page, server.url)
    assert page.text_content("#s-device") == server.health["device"]
    assert page.text_content("#s-version") == server.health["vllm_version"]
    dead = {"status": "unhealthy", "error": "EngineDeadError: the engine core died", **server.health}
    page.route("**/health", lambda route: route.fulfill(status=503, content_type="application/json",
                                                        body=json.dumps(dead)))
    page.wait_for_selector("#status[data-state=dead]", timeout=5_000)
    assert page.text_content("#status") == "engine dead"
    assert "EngineDeadError: the engine core died" in page.text_content("#s-problem")
    page.unroute("**/health")
    page.route("**/health", lambda route: route.abort())
    page.wait_for_selector("#status[data-state=unreachable]", timeout=5_000)
    assert page.text_content("#status") == "server unreachable"


# ---- the page's own arithmetic, in the browser, on made-up figures ----

def test_the_rates_read_steady_when_tokens_come_in_slow_bursts(page):
    """A loaded engine: a step every 1.4 s gives each of 16 requests a token (11.4 tokens/s in all); the panel
    reads vLLM's counter every second, the race sees each step's tokens reach the page over two frames. Neither
    the panel's rate nor the race's total drops to 0 or doubles between steps, as one-poll windows did."""
    page.route("http://page.test/**", lambda route: route.fulfill(
        path=STATIC_DIR / route.request.url.rsplit("/", 1)[1]) if route.request.url.endswith(".js")
        else route.fulfill(status=200, content_type="text/html", body="<!doctype html><title>rates</title>"))
    page.goto("http://page.test/")
    panel, race = page.evaluate("""async () => {
        const { addSample, generationRate } = await import("/page/panel.js");
        const { addBurst, burstRate } = await import("/page/race.js");
        const counter = (ms) => 16 * Math.floor(ms / 1400);
        let samples = [];
        const panel = [];
        for (let at = 300; at < 30000; at += 1000) {
            samples = addSample(samples, at, counter(at));
            panel.push(generationRate(samples, 16));
        }
        const bursts = [[0, 0]], race = [];
        for (let step = 1; step < 20; step++) {
            for (const [late, part] of [[0, 10], [16, 16]])
                addBurst(bursts, 1400 * step + 250 + late, 16 * (step - 1) + part);
            race.push([1400 * step, burstRate(bursts, 3000)]);  // once the step's tokens are all in
        }
        return [panel, race];
    }""")
    assert panel[0] is None  # requests run, no step seen yet: "–", not 0.0
    assert all(rate is None or rate > 0 for rate in panel), panel
    assert all(16 / 1.4 * 0.75 < rate < 16 / 1.4 * 1.25 for rate in panel[6:]), panel
    assert all(rate == pytest.approx(16 / 1.4, rel=0.01) for at, rate in race if at > 5000), race
    assert page.evaluate("import('/page/panel.js').then(m => m.generationRate([], 0))") == 0  # none runs


# ---- in process: the routes, the policy, --no-page ----

def test_the_page_and_its_files_are_served_with_a_strict_content_security_policy():
    client = TestClient(create_app(parse_args([]), ("generate",)))
    files = sorted(path.name for path in STATIC_DIR.iterdir() if path.name != "index.html")
    for path in ["/", *(f"/page/{name}" for name in files)]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self';")
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/page/../page.py").status_code == 404
    assert client.post("/page/race", json={"requests": [{}] * 17}).status_code == 400


def test_no_page_turns_the_page_off_and_leaves_the_api_as_it_was():
    def routes(argv):
        app = create_app(parse_args(argv), ("generate",))
        return app, {(route.path, tuple(sorted(getattr(route, "methods", None) or ()))) for route in app.routes}

    app, without = routes(["--no-page"])
    _, with_page = routes([])
    assert {path for path, _ in with_page - without} == {"/", "/page/race"} | {
        f"/page/{path.name}" for path in STATIC_DIR.iterdir() if path.name != "index.html"}
    assert TestClient(app).get("/").status_code == 404


def test_the_race_sends_each_lane_through_the_app_as_a_request_of_its_own():
    async def chat(request):  # stands in for vLLM's route
        body = await request.json()
        request.state.lane = body["lane"]  # vLLM keeps per-request data here: it must not leak across lanes
        await asyncio.sleep(0.01)
        if body["lane"] == 1:
            return JSONResponse({"error": {"message": "busy"}}, status_code=429, headers={"Retry-After": "3"})
        chunk = {"lane": request.state.lane, "id": request.headers["x-request-id"], "path": request.url.path}
        return StreamingResponse(iter([f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]),
                                 media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/page/race", race, methods=["POST"])])
    response = TestClient(app).post("/page/race", json={"requests": [{"lane": 0}, {"lane": 1}, {"lane": 2}]},
                                    headers={"X-Request-Id": "r"})
    events = list(sse_events(response.iter_lines()))
    assert events[-1] == DONE
    lanes = {i: [e for e in events[:-1] if e["lane"] == i] for i in range(3)}
    for i in (0, 2):
        assert lanes[i][0] == {"lane": i, "status": 200, "retry_after": None} and lanes[i][-1]["end"]
        text = "".join(e.get("text", "") for e in lanes[i])
        assert list(sse_events(text.splitlines())) == [
            {"lane": i, "id": f"r-lane{i + 1}", "path": "/v1/chat/completions"}, DONE]
    assert lanes[1][0] == {"lane": 1, "status": 429, "retry_after": "3"}
    assert json.loads("".join(e.get("text", "") for e in lanes[1])) == {"error": {"message": "busy"}}

