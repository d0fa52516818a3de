"""Read a stream as it arrives: every read of the socket with its time, and a relay's events (relay/relay.py).

Notebook 09 shows `timed_reads` (`#@save`) and uses it through nginx and the relay, and `drop_and_watch` to close a
tab on a relay; the tests read the relay's events with `relay_events`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import httpx

from streaming_tutorial.client.metrics import metric
from streaming_tutorial.client.waiting import wait_until


@dataclass
class TimedStream:
    status: int
    reads: list[tuple[float, bytes]] = field(default_factory=list)  # (seconds after sending, bytes of one read)

    def first(self, pattern: bytes) -> float | None:
        """Seconds until the read that completed the first match of `pattern`, a bytes regex (e.g.
        rb"event: token"); None when nothing matched."""
        seen = b""
        for at, data in self.reads:
            seen += data
            if re.search(pattern, seen):
                return at
        return None


def timed_reads(http: httpx.Client, path: str, body: dict) -> TimedStream:
    """POST `body` and keep every piece of the response as it arrives, with its time: a proxy that holds the
    stream back shows up as fewer, later pieces."""
    started = time.perf_counter()
    with http.stream("POST", path, json=body) as response:
        stream = TimedStream(response.status_code)
        for data in response.iter_bytes():  # one piece per read from the socket (decompressed if need be)
            if data:
                stream.reads.append((time.perf_counter() - started, data))
    return stream


def relay_events(body: bytes) -> list[dict]:
    """A relay's stream as events: {"event", "data", "id"} for each event, {"comment": text} for a keep-alive."""
    events = []
    for block in body.decode().split("\n\n"):
        event = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            if name == "":
                events.append({"comment": value})
            elif name == "data":
                event["data"] = json.loads(value)
            elif name in ("event", "id"):
                event[name] = value
        if event:
            events.append(event)
    return events


# A band of vllm:request_generation_tokens' buckets (1-2-5 steps) that only the lesson's dropped requests fall in
# while it watches: the busy neighbour's answers (48 tokens) are shorter than LONG_BAND[0].
LONG_BAND = (50, 100)
TEXT_CHUNK = re.compile(r'"content":"[^"]')  # a chunk of vLLM's chat stream that carries text


def finished_in_band(vllm_url: str, headers: dict | None = None, band: tuple[int, int] = LONG_BAND) -> float:
    """How many requests vLLM has finished, normally, with more than band[0] and at most band[1] generated tokens:
    the difference of two buckets of its `vllm:request_generation_tokens` histogram. An aborted request is never
    counted there (vLLM records no stats for it)."""
    text = httpx.get(vllm_url.rstrip("/") + "/metrics", headers=headers, timeout=10).text
    name = "vllm:request_generation_tokens_bucket"
    return metric(text, name, le=f"{band[1]:.1f}") - metric(text, name, le=f"{band[0]:.1f}")


@dataclass
class Drop:
    dropped_at_s: float  # after sending
    tokens_read: int  # text events (relay) or content chunks (vLLM) read before the drop
    finished_after_s: float | None  # from the drop until vLLM finished the request anyway; None: it never did


def drop_and_watch(url: str, body: dict, headers: dict, vllm_url: str, *, drop_at: float | None, window_s: float,
                   vllm_headers: dict | None = None) -> Drop:
    """POST `body` as a stream, read it, and close the connection as a closed tab does: `drop_at` seconds after
    sending, or at the first token when None. Then watch vLLM's /metrics for up to `window_s` seconds: did the
    request finish anyway (the generation went on for nobody), or was it aborted (never counted)?"""
    before = finished_in_band(vllm_url, vllm_headers)
    started, read = time.perf_counter(), 0
    # Nothing may arrive before the drop (a long prefill): a read timeout of `drop_at` s then ends the wait.
    timeout = httpx.Timeout(300, read=drop_at) if drop_at is not None else 300
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
            for line in response.iter_lines():
                read += line.startswith("event: token") or TEXT_CHUNK.search(line) is not None
                if (drop_at is None and read) or (drop_at is not None and time.perf_counter() - started >= drop_at):
                    break
    except httpx.ReadTimeout:
        pass
    dropped = time.perf_counter()  # leaving the `with` closed the connection
    try:
        wait_until(lambda: finished_in_band(vllm_url, vllm_headers) > before, window_s, interval=0.25,
                   what="the dropped request to finish")
        finished = time.perf_counter() - dropped
    except TimeoutError:
        finished = None
    return Drop(dropped - started, read, finished)
