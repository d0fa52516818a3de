"""Read a Server-Sent Events stream as vLLM sends it, on every streaming route.

Chat and completions send one line `data: <json>` per event and end with `data: [DONE]`. Errors that happen
after the 200 went out arrive as `{"error": {...}}` before `[DONE]`. The Responses API (`/v1/responses`) and the
Anthropic Messages API (`/v1/messages`) also name each event on an `event:` line before its `data:` line
(`event: response.output_text.delta`, `event: content_block_delta`, ...) and send no `[DONE]`.

    for event in sse_events(response.iter_lines()):          # data payloads only
    for name, data in named_sse_events(response.iter_lines()):  # (event name or None, payload)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import chain

DONE = "[DONE]"


def named_sse_events(lines: Iterable[str]) -> Iterator[tuple[str | None, dict | str]]:
    """Yield (event name, payload) per event: the payload parsed as JSON, or the string `[DONE]`.

    The name is that of the `event:` line of the same event, or None where the event has none. Blank lines end
    an event; `:` lines are comments (keep-alives)."""
    name: str | None = None
    data: list[str] = []
    for line in chain(lines, [""]):  # lazily: events are yielded as they arrive
        if not line.strip():
            if data:
                payload = "\n".join(data)
                yield name, (payload if payload.strip() == DONE else json.loads(payload))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].removeprefix(" "))


def sse_events(lines: Iterable[str]) -> Iterator[dict | str]:
    """Yield each event's `data:` payload: a parsed JSON chunk, or the string `[DONE]`."""
    for _, payload in named_sse_events(lines):
        yield payload
