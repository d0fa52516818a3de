"""Read a JSON answer while it streams: the text is valid JSON only at its end, so show what it holds so far.

A structured-output stream (`response_format` with a JSON schema) sends JSON text in pieces: `{"name": "Par`,
then `is", "landm`, ... `json.loads` fails on every prefix but the last. `complete_json` closes a prefix (the
open string, then the open arrays and objects, in order) after dropping what cannot be completed yet (a key
without its value, a dangling comma, a literal not yet whole), so that it parses:

    reader = PartialJSON()
    for delta in deltas:
        value = reader.feed(delta)        # {"name": "Par"}, {"name": "Paris", "landmarks": []}, ...
    final = json.loads(reader.text)       # the complete answer: parse it strictly at the end

Neither function ever raises; a prefix that holds nothing yet gives None.
"""

from __future__ import annotations

import json
from typing import Any

_CLOSER = {"{": "}", "[": "]"}
_WHITESPACE = " \t\r\n"


def complete_json(prefix: str) -> str | None:
    """`prefix` of a JSON text, closed so that `json.loads` accepts it; None when nothing can be shown yet.

    A string value that has begun is kept (closed where it stops), so text fills in as it streams; a key whose
    value has not begun is dropped, as is a literal not yet whole (`tru`); a number shows as far as it parses."""
    try:
        return _complete(prefix)
    except Exception:  # never raise on a prefix: a display helper must not break the stream it shows
        return None


def partial_json(prefix: str) -> Any:
    """The value a JSON prefix shows so far (None when nothing yet). Never raises."""
    text = complete_json(prefix)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


class PartialJSON:
    """Accumulates streamed text; `feed` returns the value shown so far (re-read from the whole text: answers
    are short, and a re-read cannot drift out of step with the text)."""

    def __init__(self) -> None:
        self.text = ""

    def feed(self, delta: str) -> Any:
        self.text += delta or ""
        return partial_json(self.text)


def _complete(prefix: str) -> str | None:
    stack: list[list] = []  # per open container: [opener, expecting a key (objects only)]
    # The last point where the text so far can be closed by appending closers: (index, closers).
    safe: tuple[int, str] | None = None
    in_string = False
    string_is_key = False
    string_start = 0
    escape = False
    i = 0
    n = len(prefix)
    started = False  # has the top-level value begun?

    def closers() -> str:
        return "".join(_CLOSER[opener] for opener, _ in reversed(stack))

    while i < n:
        c = prefix[i]
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
                if not string_is_key:
                    safe = (i + 1, closers())
                    if not stack:
                        return prefix[:i + 1]  # a complete top-level string
            i += 1
            continue
        if c in _WHITESPACE:
            i += 1
            continue
        if c in "{[":
            started = True
            stack.append([c, c == "{"])
            safe = (i + 1, closers())
        elif c in "}]":
            if not stack or _CLOSER[stack[-1][0]] != c:
                return None  # not JSON: nothing sensible to show
            stack.pop()
            safe = (i + 1, closers())
            if not stack:
                return prefix[:i + 1]  # the top-level value is complete
        elif c == ",":
            if stack and stack[-1][0] == "{":
                stack[-1][1] = True
        elif c == ":":
            if stack and stack[-1][0] == "{":
                stack[-1][1] = False
        elif c == '"':
            started = True
            in_string = True
            string_is_key = bool(stack) and stack[-1][0] == "{" and stack[-1][1]
            string_start = i
        else:  # a number or a literal: complete once a delimiter follows it
            started = True
            j = i
            while j < n and prefix[j] not in ",]}" + _WHITESPACE:
                j += 1
            if j < n:  # a delimiter follows: the token is whole
                safe = (j, closers())
                if not stack:
                    return prefix[:j]
            else:  # the text ends inside it: show the longest part of it that parses (`1.` shows as 1)
                shown = _longest_scalar(prefix[i:j])
                if shown:
                    return prefix[:i] + shown + closers()
                break
            i = j
            continue
        i += 1

    if not started:
        return None
    if in_string and not string_is_key:
        body = prefix[string_start:]
        if escape:  # a lone trailing backslash: drop it
            body = body[:-1]
        body = _drop_partial_unicode_escape(body)
        return prefix[:string_start] + body + '"' + closers()
    if safe is None:
        return None
    index, tail = safe
    return prefix[:index] + tail


def _longest_scalar(token: str) -> str:
    """The longest start of `token` that is a whole JSON number or literal ("" if none): a number is shown as
    far as it has come (`-12.` as -12), so a shown value never disappears; `tru` is not shown until it is `true`."""
    if token in ("true", "false", "null"):
        return token
    if not token or token[0] not in "-0123456789":
        return ""
    for end in range(len(token), 0, -1):
        try:
            json.loads(token[:end])
        except ValueError:
            continue
        return token[:end]
    return ""


def _drop_partial_unicode_escape(body: str) -> str:
    cut = body.rfind("\\u")
    if cut != -1 and len(body) - cut < 6:
        # Only an unfinished escape: count the backslashes before it (an escaped backslash is not an escape).
        slashes = len(body[:cut]) - len(body[:cut].rstrip("\\"))
        if slashes % 2 == 0:
            return body[:cut]
    return body
