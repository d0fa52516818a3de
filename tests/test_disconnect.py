"""A client that drops the connection mid-stream gets its request aborted in the engine within seconds.

Proof from vLLM's /metrics, not the log: the request is first seen running (vllm:num_requests_running),
then after the drop the running gauge falls back, vllm:generation_tokens_total stops growing, and the
request is not counted as finished normally. vLLM 0.32 does not count client aborts in
vllm:request_success_total{finished_reason="abort"}: `OutputProcessor.abort_requests` drops the request's
state without recording finished-request stats (that label only counts engine-internal aborts), so the
abort counter's delta is printed, not asserted. Tests share the session server: everything is a delta."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
from server_checks import metrics, wait_for

from streaming_tutorial.client.metrics import metric

ABORT_DEADLINE = 2.0  # seconds from the drop until the engine no longer runs the request
# Long enough to be mid-stream when dropped (~50 s at 20 tokens/s), within the server's 1024-token cap per request.
LONG = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}
FINISHED_NORMALLY = ("stop", "length", "error", "repetition")


class Engine:
    def __init__(self, server):
        self.url = server.url

    def sample(self) -> dict:
        m = metrics(self.url)
        return {"running": metric(m, "vllm:num_requests_running"),
                "waiting": metric(m, "vllm:num_requests_waiting"),
                "tokens": metric(m, "vllm:generation_tokens_total"),
                "finished": sum(metric(m, "vllm:request_success_total", finished_reason=r) for r in FINISHED_NORMALLY),
                "aborted": metric(m, "vllm:request_success_total", finished_reason="abort")}

    def idle(self) -> dict:
        return wait_for(lambda: (s := self.sample())["running"] == 0 and s["waiting"] == 0 and s, 120,
                        what="the engine to be idle before the test")

    def stopped_generating(self) -> dict:
        previous = [self.sample()]

        def stable():
            time.sleep(0.25)  # the interval between two polls of the token counter
            current = self.sample()
            same = current["tokens"] == previous[0]["tokens"]
            previous[0] = current
            return same and current

        return wait_for(stable, 10, interval=0, what="generation_tokens_total to stop growing")


def check_abort(server, open_stream, drop) -> float:
    """Open a long stream, see it running, drop it; return seconds until the engine stopped running it."""
    engine = Engine(server)
    before = engine.idle()
    handle = open_stream()
    running = wait_for(lambda: (s := engine.sample())["running"] >= 1 and s, 30, what="the request to run")
    tokens_at_drop = running["tokens"]
    dropped = time.perf_counter()
    drop(handle)
    wait_for(lambda: engine.sample()["running"] == 0, ABORT_DEADLINE + 3, interval=0.02,
             what="the running gauge to fall after the disconnect")
    latency = time.perf_counter() - dropped
    after = engine.stopped_generating()
    print(f"\nabort after disconnect: running gauge fell {latency * 1000:.0f} ms after the drop; "
          f"{after['tokens'] - tokens_at_drop:.0f} tokens generated after the drop; abort counter "
          f"{before['aborted']:.0f} -> {after['aborted']:.0f}")
    assert latency < ABORT_DEADLINE
    assert after["finished"] == before["finished"], "the dropped request finished normally instead of aborting"
    assert after["tokens"] - before["tokens"] < LONG["max_tokens"]
    assert after["running"] == 0 and after["waiting"] == 0
    return latency


def serves_others(server, model_name):
    response = httpx.post(server.url_for("v1", "completions"), headers=server.headers, timeout=60,
                          json={"model": model_name, "prompt": "Hello", "max_tokens": 4})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.url_for("health"), timeout=10).status_code == 200


def test_raw_socket_close_aborts_the_request(server, model_name):
    body = json.dumps({"model": model_name, "prompt": "Once upon a time", "stream": True, **LONG}).encode()

    def open_stream():
        sock = socket.create_connection((server.host, server.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (server.host.encode(), len(body)) + body)
        received = b""
        while received.count(b"data:") < 3:  # the stream is flowing
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        return sock

    check_abort(server, open_stream, lambda sock: sock.close())
    serves_others(server, model_name)


def test_openai_stream_close_aborts_the_request(server, model_name):
    client = openai.OpenAI(base_url=server.url_for("v1"), api_key=server.api_key or "unused", timeout=60,
                           max_retries=0)

    def open_stream():
        stream = client.chat.completions.create(
            model=model_name, stream=True, messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=LONG["max_tokens"], temperature=0, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        return stream

    check_abort(server, open_stream, lambda stream: stream.close())
    serves_others(server, model_name)
