"""Streaming through the real vLLM server: SSE framing, usage accounting, determinism, errors."""

from __future__ import annotations

import re

import vllm

from streaming_tutorial.client.sse import DONE, sse_events
from streaming_tutorial.model import DEFAULT_MODEL_NAME, GENERATION_DEFAULTS
from streaming_tutorial.processes.local_server import PROJECT_ROOT

SYSTEM_PROMPT = "You are a helpful assistant."
QUESTION = "What is the capital of France?"


def chat_messages(question: str = QUESTION) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def stream(http, path: str, body: dict) -> list:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response.iter_lines()))


def chat_text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


def completion_text(events) -> str:
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


def test_the_server_announces_itself_once_ready(server, http):
    assert http.get("/health").status_code == 200
    assert f"Ready: {server.url}\n" in server.log_path.read_text(errors="replace")


def test_health_is_json(http):
    response = http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["model"] == DEFAULT_MODEL_NAME
    assert body["vllm_version"] == vllm.__version__
    assert body["device"] in ("cpu", "cuda")


def test_models_lists_the_default_model(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]


def test_chat_streams_several_events_and_ends_with_done(http, model_name):
    events = stream(http, "/v1/chat/completions",
                    {"model": model_name, "messages": chat_messages(), "max_tokens": 32, "temperature": 0})
    assert events[-1] == DONE
    chunks = events[:-1]
    assert len(chunks) >= 3, events
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chat_text(events).strip()


def test_completion_streams_several_events_and_ends_with_done(http, model_name):
    events = stream(http, "/v1/completions",
                    {"model": model_name, "prompt": "The three primary colors are", "max_tokens": 16,
                     "temperature": 0, "ignore_eos": True})
    assert events[-1] == DONE
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert len([t for t in texts if t]) >= 3, events
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_usage_chunk_counts_exactly_the_streamed_tokens(http, model_name):
    events = stream(http, "/v1/chat/completions",
                    {"model": model_name, "messages": chat_messages(), "max_tokens": 256, "temperature": 0,
                     "return_token_ids": True, "stream_options": {"include_usage": True}})
    assert events[-1] == DONE
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    token_chunks = [e for e in events[:-2] if e["choices"]]
    finish_reasons = [c["choices"][0]["finish_reason"] for c in token_chunks if c["choices"][0]["finish_reason"]]
    assert finish_reasons == ["stop"], "the request must end on its own, not on max_tokens"
    streamed_ids = [t for c in token_chunks for t in (c["choices"][0].get("token_ids") or [])]
    assert len(streamed_ids) >= 2
    assert usage_chunk["usage"]["completion_tokens"] == len(streamed_ids)
    assert usage_chunk["usage"]["total_tokens"] == (usage_chunk["usage"]["prompt_tokens"]
                                                    + usage_chunk["usage"]["completion_tokens"])


def test_streamed_chat_equals_the_non_streamed_answer(http, model_name):
    body = {"model": model_name, "messages": chat_messages("Name three fruits."), "max_tokens": 48,
            "temperature": 0}
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert whole
    assert chat_text(stream(http, "/v1/chat/completions", body)) == whole


def test_streamed_completion_equals_the_non_streamed_answer(http, model_name):
    body = {"model": model_name, "prompt": "Water boils at", "max_tokens": 24, "temperature": 0}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert whole
    assert completion_text(stream(http, "/v1/completions", body)) == whole


def test_bundled_model_answers_paris(client, model_name):
    """Proves the GGUF -> safetensors conversion kept the model intact: with the seed's system prompt
    and greedy decoding, SmolLM2-135M-Instruct names Paris (without a system prompt it may not)."""
    answer = client.chat.completions.create(model=model_name, messages=chat_messages(), temperature=0,
                                            max_tokens=32).choices[0].message.content
    assert "Paris" in answer


def test_unknown_model_is_a_404_in_vllm_error_shape(http):
    response = http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": chat_messages()})
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert "no-such-model" in error["message"]
    assert http.get("/health").status_code == 200


def test_health_shows_what_a_request_gets_for_the_sampling_parameters_it_leaves_out(http):
    defaults = http.get("/health").json()["sampling_defaults"]
    expected = {**GENERATION_DEFAULTS, "max_tokens": GENERATION_DEFAULTS["max_new_tokens"]}
    expected.pop("max_new_tokens")
    assert defaults == expected


def readme_story_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (PROJECT_ROOT / "README.md").read_text(), re.S)
    return next(block for block in blocks if "Tell me a story" in block)


def test_readmes_story_ends_by_itself_or_at_the_models_default_cap_and_says_which(server, http, model_name,
                                                                                    capsys):
    """README's story example, run as printed (only the address is this server's): with no max_tokens and no
    sampling settings vLLM applies the bundled model's generation config, so the story ends by itself (`stop`)
    or at its 512-token default (`length`) instead of running to the context's end, and its last line says
    which (issue 22: a story cut mid-sentence, with no word of why)."""
    code = readme_story_example()
    assert "max_tokens" not in code and "http://127.0.0.1:8000/v1" in code
    exec(code.replace("http://127.0.0.1:8000", server.url), {})
    story, last = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert re.fullmatch(r"\[finish_reason: (stop|length)\]", last), last
    assert story.strip()
    tokens = http.post("/tokenize", json={"model": model_name, "prompt": story, "add_special_tokens": False})
    assert tokens.json()["count"] <= GENERATION_DEFAULTS["max_new_tokens"] + 8  # re-tokenized: within a few


def test_a_requests_own_max_tokens_wins_over_the_models_default_cap(http, model_name):
    cap = GENERATION_DEFAULTS["max_new_tokens"]
    events = stream(http, "/v1/completions", {"model": model_name, "prompt": "Once upon a time",
                                               "max_tokens": cap + 8, "ignore_eos": True, "temperature": 0,
                                               "stream_options": {"include_usage": True}})
    assert events[-2]["usage"]["completion_tokens"] == cap + 8


def test_a_seeded_request_whose_prompt_takes_several_prefill_steps_is_answered(http, model_name):
    """streaming_tutorial/server/seeded_sampling.py: vLLM 0.32 rewinds a seeded request's generator after each partial
    prefill, which a CPU generator cannot do; without the fix the engine died on the first such request."""
    prompt = " ".join(f"word{i}" for i in range(400))  # about 1,500 tokens: many steps of the CPU prefill budget
    for seed in (7, 8):  # the second is partly served from the prefix cache: a prefill of other chunks
        body = {"model": model_name, "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": seed}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 8
    assert http.get("/health").status_code == 200
