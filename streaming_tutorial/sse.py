"""Read a Server-Sent Events stream as vLLM's OpenAI-compatible server sends it.

Each event is one line `data: <payload>` followed by a blank line; the payload is a JSON chunk, and
the last one is the literal `[DONE]`. Errors that happen after the 200 went out arrive as a chunk
`{"error": {...}}` before `[DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

DONE = "[DONE]"


def sse_events(lines: Iterable[str]) -> Iterator[dict | str]:
    """Yield each `data:` payload: a parsed JSON chunk, or the string `[DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, `:` keep-alive comments
        payload = line[len("data:"):].strip()
        yield payload if payload == DONE else json.loads(payload)
