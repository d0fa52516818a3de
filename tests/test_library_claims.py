"""What a lesson says of a library's behaviour holds for the pinned version: a release that changes it fails here,
before it misleads a learner."""

from __future__ import annotations

import inspect

import anthropic


def test_anthropics_messages_stream_takes_no_temperature_so_notebook_06_sends_it_in_extra_body():
    client = anthropic.Anthropic(api_key="unused", base_url="http://127.0.0.1:9")
    assert "temperature" not in inspect.signature(client.messages.stream).parameters
    assert "extra_body" in inspect.signature(client.messages.stream).parameters
