"""The partial-JSON reader (client/structured.py) and the tool-call assembler (tools.py). No server."""

from __future__ import annotations

import json

import openai.types.chat.chat_completion_chunk as chunk_types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_tutorial.client.structured import PartialJSON, complete_json, partial_json
from streaming_tutorial.client.tools import ToolCallAssembler, ToolCallStreamError

RECORD = {"name": "Paris", "country": "France", "landmarks": ["Eiffel \u00e9 Tower", "Louvre \"Mus\\eum\""],
          "population": -2.1e6, "capital": True, "motto": None, "nested": {"a": [1, {"b": []}]}}


def prefixes(text: str):
    return (text[:i] for i in range(len(text) + 1))


@pytest.mark.parametrize("indent", [None, 2])
def test_every_prefix_of_a_record_completes_to_json_that_parses(indent):
    text = json.dumps(RECORD, indent=indent, ensure_ascii=indent is None)
    assert complete_json("") is None  # nothing has begun: nothing to complete
    for prefix in list(prefixes(text))[1:]:
        completed = complete_json(prefix)
        assert completed is not None, prefix
        json.loads(completed)  # raises if the reader produced invalid JSON
    assert partial_json(text) == RECORD


def grows(old, new) -> bool:
    """Whether `new` shows all that `old` showed: keys in the same order, strings extended, lists longer, each
    value grown in turn. A number may change as its digits arrive (1 -> 12 -> 12.5), but stays a number."""
    if old is None:
        return True
    if isinstance(old, dict):
        return (isinstance(new, dict) and list(new)[:len(old)] == list(old)
                and all(grows(value, new[key]) for key, value in old.items()))
    if isinstance(old, list):
        return isinstance(new, list) and len(new) >= len(old) and all(map(grows, old, new))
    if isinstance(old, str):
        return isinstance(new, str) and new.startswith(old)
    if isinstance(old, bool):
        return new is old
    return isinstance(new, int | float) and not isinstance(new, bool)


def test_values_fill_in_as_the_text_arrives_and_never_go_backwards():
    text = json.dumps(RECORD)
    shown = None
    for prefix in prefixes(text):
        value = partial_json(prefix)
        assert grows(shown, value), (prefix, shown, value)
        shown = value
    assert shown == RECORD


def test_growing_catches_a_value_that_goes_backwards():
    assert grows({"a": "Pa"}, {"a": "Par", "b": []}) and grows([1], [12, 3])
    assert not grows({"a": "Par"}, {"a": "Pa"}) and not grows({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not grows([1, 2], [1]) and not grows({"a": []}, {}) and not grows(True, None)


@pytest.mark.parametrize(("prefix", "shown"), [
    ("", None),
    ("   ", None),
    ("{", {}),
    ('{"na', {}),                        # a key without its value is dropped
    ('{"name": ', {}),
    ('{"name": "Par', {"name": "Par"}),  # a string value shows as far as it has come
    ('{"name": "Paris", ', {"name": "Paris"}),
    ('{"tags": ["a", "b', {"tags": ["a", "b"]}),
    ('{"n": -', {}),                     # half a number is not shown
    ('{"n": 1.', {"n": 1}),              # a number shows as far as it parses, so it never disappears
    ('{"n": 12', {"n": 12}),
    ('{"n": 2e', {"n": 2}),
    ('{"ok": tr', {}),
    ('{"ok": true', {"ok": True}),
    ('{"s": "a\\', {"s": "a"}),          # a lone trailing backslash is dropped
    ('{"s": "\\u00', {"s": ""}),         # so is half a \\u escape
    ('{"s": "\\\\u00', {"s": "\\u00"}),  # ... but not an escaped backslash before a u
    ('[1, [2, {"x": [', [1, [2, {"x": []}]]),
    ('"abc', "abc"),
])
def test_prefixes_show_what_they_hold_so_far(prefix, shown):
    assert partial_json(prefix) == shown


def test_text_after_the_top_level_value_is_ignored():
    assert partial_json('{"a": 1}\n\nsome trailing text') == {"a": 1}


@pytest.mark.parametrize("garbage", ["}", "{]", "[}", "not json", "{\"a\" 1 2 ]", "\x00\\\"{[", "-", "nul"])
def test_text_that_is_not_json_gives_none_or_a_value_but_never_raises(garbage):
    for prefix in prefixes(garbage):
        value, completed = partial_json(prefix), complete_json(prefix)
        assert completed is None or isinstance(completed, str), (prefix, completed)
        if value is not None:  # a value is what the completed text parses to
            assert json.loads(completed) == value, (prefix, completed, value)
    assert partial_json(garbage) in (None, {}, [])  # never more than an empty container


@settings(max_examples=150, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=5), children, max_size=4), max_leaves=12),
       st.booleans())
def test_any_json_document_every_prefix_parses_once_completed(document, indent):
    text = json.dumps(document, indent=2 if indent else None, ensure_ascii=not indent)
    for prefix in prefixes(text):
        completed = complete_json(prefix)
        if completed is not None:
            json.loads(completed)
    assert partial_json(text) == document


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet='{}[]",:\\ ue0.-1truefalsnl', max_size=40))
def test_random_text_never_raises(text):
    partial_json(text)


def test_the_streaming_reader_feeds_deltas():
    reader = PartialJSON()
    values = [reader.feed(piece) for piece in ['{"ci', 'ty": "Pa', 'ris", "tags": [', '"x"]}']]
    assert values == [{}, {"city": "Pa"}, {"city": "Paris", "tags": []}, {"city": "Paris", "tags": ["x"]}]
    assert reader.text == '{"city": "Paris", "tags": ["x"]}'


# --- tool calls ---------------------------------------------------------------------------------------------

def vllm_fragments(call_id: str, index: int, name: str, arguments: str, size: int = 3) -> list[dict]:
    """Fragments as vLLM streams them: the first has id, type and name; the rest carry argument pieces."""
    pieces = [arguments[i:i + size] for i in range(0, len(arguments), size)]
    first = {"id": call_id, "type": "function", "index": index, "function": {"name": name, "arguments": pieces[0]}}
    return [first, *({"index": index, "function": {"name": None, "arguments": p}} for p in pieces[1:])]


def test_fragments_of_two_calls_assemble_by_index_even_when_interleaved():
    a = vllm_fragments("call-a", 0, "get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))
    b = vllm_fragments("call-b", 1, "add", json.dumps({"a": 2, "b": 3}))
    assembler = ToolCallAssembler()
    for i in range(max(len(a), len(b))):
        assembler.add(a[i:i + 1] + b[i:i + 1])  # one chunk may carry fragments of several calls
    first, second = assembler.calls
    assert (first.id, first.name, first.parsed_arguments()) == ("call-a", "get_weather",
                                                                {"city": "Paris", "unit": "celsius"})
    assert (second.id, second.name, second.parsed_arguments()) == ("call-b", "add", {"a": 2, "b": 3})
    assert assembler.fragments == len(a) + len(b)


def test_the_openai_clients_fragment_objects_assemble_too():
    fragments = [chunk_types.ChoiceDeltaToolCall.model_validate(f)
                 for f in vllm_fragments("call-1", 0, "add", '{"a": 1, "b": 2}')]
    assembler = ToolCallAssembler()
    for fragment in fragments:
        assembler.add([fragment])
    assert assembler.calls[0].parsed_arguments() == {"a": 1, "b": 2}


def test_arguments_do_not_parse_until_the_last_fragment():
    assembler = ToolCallAssembler()
    fragments = vllm_fragments("c", 0, "add", '{"a": 1, "b": 2}')
    for fragment in fragments[:-1]:
        assembler.add([fragment])
        with pytest.raises(json.JSONDecodeError):
            assembler.calls[0].parsed_arguments()
    assembler.add(fragments[-1:])
    assert assembler.calls[0].parsed_arguments() == {"a": 1, "b": 2}


def test_the_assistant_message_carries_every_call_for_the_next_request():
    assembler = ToolCallAssembler()
    assembler.add(vllm_fragments("c1", 0, "add", '{"a": 1}'))
    assert assembler.assistant_message() == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}


def test_no_fragments_means_no_calls():
    assembler = ToolCallAssembler()
    assembler.add(None)
    assembler.add([])
    assert assembler.calls == [] and len(assembler) == 0


def test_a_call_whose_id_changes_is_an_error():
    assembler = ToolCallAssembler()
    assembler.add(vllm_fragments("c1", 0, "add", "{}"))
    with pytest.raises(ToolCallStreamError, match="changed its id"):
        assembler.add([{"id": "c2", "index": 0, "function": {"name": "add", "arguments": ""}}])


def test_arguments_without_a_name_are_an_error():
    assembler = ToolCallAssembler()
    assembler.add([{"index": 0, "function": {"arguments": "{}"}}])
    with pytest.raises(ToolCallStreamError, match="no function name"):
        _ = assembler.calls
