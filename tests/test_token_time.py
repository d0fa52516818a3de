"""streaming_tutorial.client.token_time (notebook 08's measurements): the arithmetic and parsing, no server."""

from __future__ import annotations

import json
import math
import random
import struct
import time

import pytest

from streaming_tutorial.client.bound import (
    matmul_flops,
    read_bandwidth,
    safetensors_parameters,
    served_bytes_per_param,
    served_model_dir,
)
from streaming_tutorial.client.latency import RequestResult
from streaming_tutorial.client.token_time import (
    Anatomy,
    Level,
    OtherRequests,
    Timed,
    requests_on_server,
    server_defaults,
    server_itl_window,
    system_prompt,
)
from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME

# The bundled model's shape (config.json): 30 layers, 3 KV heads of 64.
CONFIG = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
          "hidden_size": 576, "dtype": "bfloat16"}


def cache_info(memory_bytes, size_tokens, cache_dtype="auto") -> str:
    return ("# TYPE vllm:cache_config_info gauge\n"
            f'vllm:cache_config_info{{block_size="128",cache_dtype="{cache_dtype}",engine="0",'
            f'kv_cache_memory_bytes="{memory_bytes}",kv_cache_size_tokens="{size_tokens}"}} 1.0\n')


def write_safetensors(path, tensors: dict[str, list[int]]) -> None:
    header = {name: {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]} for name, shape in tensors.items()}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_parameters_come_from_the_headers_of_every_file(tmp_path):
    write_safetensors(tmp_path / "model-00001.safetensors", {"a": [3, 4], "b": [5]})
    write_safetensors(tmp_path / "model-00002.safetensors", {"c": [2, 2, 2]})
    assert safetensors_parameters(tmp_path) == 12 + 5 + 8


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").is_file(), reason="model not prepared")
def test_the_bundled_model_has_135m_weights():
    assert safetensors_parameters(DEFAULT_MODEL_DIR) == 134_515_008  # 269 MB in bf16, tied embeddings once


@pytest.mark.parametrize("size", [2, 4])
def test_bytes_per_weight_from_the_kv_cache_size(size):
    per_token = 2 * 30 * 3 * 64 * size
    blocks = (1 << 30) // (128 * per_token)  # as vLLM sizes it: whole blocks of 128 tokens
    found, how = served_bytes_per_param(cache_info(1 << 30, blocks * 128), CONFIG)
    assert found == size and "KV cache" in how


def test_bytes_per_weight_falls_back_to_config_json():
    # A GPU server sizes its cache by --gpu-memory-utilization: no bytes in the labels.
    assert served_bytes_per_param(cache_info("None", 46592), CONFIG)[0] == 2
    assert served_bytes_per_param(cache_info(1 << 30, 46592, cache_dtype="fp8"), CONFIG)[0] == 2  # not the model's
    assert served_bytes_per_param("", {**CONFIG, "dtype": "float32"}) == (4, "config.json's dtype, float32 "
                                                                         "(what vLLM's `--dtype auto` loads on a GPU)")


def test_served_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert served_model_dir({"data": [{"id": "x", "root": str(tmp_path)}]}, DEFAULT_MODEL_DIR, "y") == tmp_path
    elsewhere = {"data": [{"id": "m", "root": "/nowhere/m"}]}
    assert served_model_dir(elsewhere, tmp_path, "m") == tmp_path  # the bundled model, another copy
    assert served_model_dir(elsewhere, tmp_path, DEFAULT_MODEL_NAME) is None


METRICS = """# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_count{{engine="0"}} {count}
vllm:inter_token_latency_seconds_sum{{engine="0"}} {total}
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0"}} {waiting}
"""


def test_server_itl_is_the_mean_over_the_window():
    before = METRICS.format(count=100, total=2.0, running=0, waiting=0)
    after = METRICS.format(count=164, total=3.6, running=9, waiting=2)
    assert server_itl_window(before, after) == pytest.approx(1.6 / 64)
    assert server_itl_window(before, before) is None
    assert requests_on_server(after) == 11


def test_other_requests_note_says_when_a_rate_is_a_share():
    watch = OtherRequests("http://127.0.0.1:9")
    watch.counts = [0, 0, 1]
    assert not watch.shared and "no other requests" in watch.note()
    watch.counts = [8, 7, 8, 9]
    assert watch.shared and "NOTE: about 8 other requests" in watch.note("the rate") and "is a share" in watch.note()


def test_other_requests_polls_until_stopped(monkeypatch):
    import streaming_tutorial.client.token_time as token_time

    class Response:
        text = METRICS.format(count=0, total=0, running=3, waiting=1)

    monkeypatch.setattr(token_time.httpx.Client, "get", lambda self, path: Response())
    with OtherRequests("http://127.0.0.1:9", own=1, every=0.01) as watch:
        deadline = time.monotonic() + 10
        while len(watch.counts) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert set(watch.counts) == {3.0} and watch.median == 3


def timed(tpot_ms: float, server_ms: float | None, tokens: int = 11) -> Timed:
    result = RequestResult(chunk_times=[0.1 + i * tpot_ms / 1e3 for i in range(tokens)], output_tokens=tokens)
    return Timed(result, server_ms / 1e3 if server_ms is not None else None)


def test_anatomy_splits_one_token_into_parts_that_add_up():
    measured = {"greedy": [timed(20, 19.5), timed(21, 20.5), timed(20, 19.5)],
                "server defaults": [timed(21, 20.5), timed(22, 21.5), timed(21, 20.5)]}
    anatomy = Anatomy.of(measured, weights=0.015)
    assert anatomy.measured == pytest.approx(0.020)
    assert anatomy.sampler == pytest.approx(0.001)
    assert anatomy.output_path == pytest.approx(0.0005)
    reading, rest, output, sampler = anatomy.parts.values()
    assert (reading, rest) == (pytest.approx(0.015), pytest.approx(0.0045))
    assert reading + rest + output == pytest.approx(anatomy.measured)
    # A bound slower than the step (a busy machine measured a low bandwidth): no negative part.
    assert min(Anatomy.of(measured, weights=0.5).parts.values()) >= 0


def test_level_batch_counts_the_other_clients():
    assert Level(4, 100.0, 0.04, others=8.0).batch == 12


def test_request_bodies():
    body = {"model": "m", "prompt": [1], "temperature": 0, "top_p": 1, "max_tokens": 4, "ignore_eos": True}
    assert server_defaults(body) == {"model": "m", "prompt": [1], "max_tokens": 4, "ignore_eos": True}
    assert system_prompt(random.Random(1), 3) == system_prompt(random.Random(1), 3)
    assert system_prompt(random.Random(1), 3).count("\n") == 3


def test_bandwidth_and_arithmetic_are_finite_and_positive():
    assert 0 < read_bandwidth("cpu", size_bytes=8 << 20, repeats=2) < math.inf
    assert 0 < matmul_flops("cpu", "float32", n=128, repeats=2) < math.inf
