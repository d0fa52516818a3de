"""The seed's plain-vLLM start command still works on this install (docs/setup.md, "Plain vLLM alternative")."""

from __future__ import annotations

import sys

import httpx
import openai
import pytest
from server_checks import own_server

from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME

pytestmark = pytest.mark.server  # every test here starts its own server

PLAIN_VLLM = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


@pytest.fixture(scope="module")
def plain_server():
    # An own server (eager, small KV cache): it only has to prove the command works.
    with own_server("plain-vllm", ["--model", str(DEFAULT_MODEL_DIR), "--served-model-name", DEFAULT_MODEL_NAME],
                    command=PLAIN_VLLM) as running:
        yield running


def test_plain_vllm_health_is_an_empty_200(plain_server):
    """What our JSON /health replaces (and what notebooks must accept from a plain `vllm serve`)."""
    response = httpx.get(plain_server.url_for("health"))
    assert response.status_code == 200
    assert response.content == b""


def test_plain_vllm_streams_the_seed_example(plain_server):
    client = openai.OpenAI(base_url=plain_server.url_for("v1"), api_key="EMPTY", max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=32,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of France?"}])
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "".join(pieces).strip()
