"""Assemble streamed tool calls: a chat stream sends each call in fragments under `delta.tool_calls`.

The first fragment of a call carries its `index`, `id`, `type` and `function.name`; the ones after it carry
the same `index` and the next piece of `function.arguments` (a JSON text that parses only once complete).
Several calls in one answer have different indexes:

    calls = ToolCallAssembler()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.tool_calls:
            calls.add(chunk.choices[0].delta.tool_calls)
    for call in calls.calls:
        print(call.id, call.name, call.parsed_arguments())   # json.loads of the whole arguments text
    messages.append(calls.assistant_message())               # to send the results back

Fragments may be dicts (raw SSE) or the `openai` client's objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class ToolCallStreamError(ValueError):
    """The fragments do not describe a call (no name ever came for an index, or ids disagree)."""


@dataclass
class ToolCall:
    index: int
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: str = ""  # the JSON text, concatenated from every fragment

    def parsed_arguments(self) -> Any:
        """The arguments as a Python value; raises json.JSONDecodeError while the text is incomplete."""
        return json.loads(self.arguments) if self.arguments.strip() else {}

    def as_message_part(self) -> dict:
        """This call in the shape an assistant message's `tool_calls` list takes."""
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


def _as_dict(fragment: Any) -> dict:
    if isinstance(fragment, dict):
        return fragment
    if hasattr(fragment, "model_dump"):  # the openai client's ChoiceDeltaToolCall
        return fragment.model_dump()
    raise TypeError(f"a tool-call fragment is a dict or an openai object, not {type(fragment).__name__}")


class ToolCallAssembler:
    """Collects `delta.tool_calls` fragments into whole calls, keyed by `index`."""

    def __init__(self) -> None:
        self._calls: dict[int, ToolCall] = {}
        self.fragments = 0

    def add(self, fragments: Iterable[Any] | None) -> None:
        """Fold one chunk's `delta.tool_calls` list (None or empty is fine) into the calls."""
        for raw in fragments or ():
            fragment = _as_dict(raw)
            self.fragments += 1
            index = fragment.get("index")
            if index is None:  # some servers omit it when there is one call
                index = max(self._calls, default=0)
            call = self._calls.get(index)
            if call is None:
                call = self._calls[index] = ToolCall(index=index)
            if fragment.get("id"):
                if call.id and call.id != fragment["id"]:
                    raise ToolCallStreamError(f"tool call {index} changed its id from {call.id!r} to "
                                              f"{fragment['id']!r}")
                call.id = fragment["id"]
            if fragment.get("type"):
                call.type = fragment["type"]
            function = fragment.get("function") or {}
            if function.get("name") and not call.name:  # later fragments repeat it or send null
                call.name = function["name"]
            call.arguments += function.get("arguments") or ""

    @property
    def calls(self) -> list[ToolCall]:
        """The calls so far, in index order. Each has a name once its first fragment has arrived."""
        calls = [self._calls[i] for i in sorted(self._calls)]
        for call in calls:
            if not call.name:
                raise ToolCallStreamError(f"tool call {call.index} has arguments but no function name")
        return calls

    def __len__(self) -> int:
        return len(self._calls)

    def assistant_message(self, content: str | None = None) -> dict:
        """The assistant turn to append to `messages` before the tool results (one `tool` message per call)."""
        return {"role": "assistant", "content": content,
                "tool_calls": [call.as_message_part() for call in self.calls]}
