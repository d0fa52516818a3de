"""A CPU server saves its compiled model and reuses it on the next start (streaming_tutorial/server/compile_cache.py),
and on a small CPU runs the model inside its EngineCore process (cpu_defaults.worker_inside_engine_core)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch.compiler

from streaming_tutorial.server import compile_cache
from streaming_tutorial.server.args import parse_args
from streaming_tutorial.server.cpu_defaults import running_on_cpu


def loaded_function(compiled_fn) -> SimpleNamespace:
    """The shape of what `torch.compiler.load_compiled_function` returns, as far as vLLM uses it."""
    return SimpleNamespace(_artifacts=SimpleNamespace(compiled_fn=compiled_fn))


def test_a_loaded_inductor_function_gets_a_no_op_finalize_loading(monkeypatch):
    inductor_fn = SimpleNamespace()  # like torch's BundledAOTAutogradSerializableCallable: no such method
    loaded = loaded_function(inductor_fn)
    original = lambda *args, **kwargs: loaded  # noqa: E731
    monkeypatch.setattr(torch.compiler, "load_compiled_function", original)
    compile_cache.let_inductor_artifacts_load()
    compile_cache.let_inductor_artifacts_load()
    assert torch.compiler.load_compiled_function.__wrapped__ is original  # wrapped once, not twice
    assert torch.compiler.load_compiled_function("artifact file", f_globals={}) is loaded
    assert inductor_fn.finalize_loading("vllm config") is None


def test_vllm_own_finalize_loading_is_left_alone(monkeypatch):
    calls = []
    vllm_fn = SimpleNamespace(finalize_loading=calls.append)  # vLLM's VllmSerializableFunction, as on a GPU
    monkeypatch.setattr(torch.compiler, "load_compiled_function", lambda *args, **kwargs: loaded_function(vllm_fn))
    compile_cache.let_inductor_artifacts_load()
    torch.compiler.load_compiled_function("artifact file")._artifacts.compiled_fn.finalize_loading("vllm config")
    assert calls == ["vllm config"]


def test_the_session_server_saved_or_reused_its_compiled_model(server):
    log = server.log_path.read_text(errors="replace")
    assert "due to a load failure" not in log
    assert "saved AOT compiled function" in log or "Directly load AOT compilation" in log


def test_on_a_small_cpu_the_model_runs_inside_the_engine_core_on_every_core(server, model_name):
    """cpu_defaults.worker_inside_engine_core: no Worker process, and none of the three vLLM messages that
    setting would otherwise log (quiet_uniprocess_warnings) while vLLM keeps the compute threads it bound.
    Elsewhere vLLM's own layout stands: a Worker beside the EngineCore on a bigger CPU, none on one GPU."""
    args = parse_args([])
    names = [p.name() for p in server.process_tree()]
    log = server.log_path.read_text(errors="replace")
    workers = [n for n in names if n.startswith("VLLM::Worker")]
    if args.distributed_executor_backend != "uni":  # vLLM's own choice of executor
        if running_on_cpu():  # a bigger CPU: vLLM's CPU platform turns one worker's "uni" into "mp", a Worker
            assert workers, names
        else:  # one GPU: vLLM keeps "uni" (ParallelConfig, world size 1), the model inside the EngineCore
            assert args.tensor_parallel_size * args.pipeline_parallel_size == 1
            assert "VLLM::EngineCore" in names and not workers, names
        return
    assert "VLLM::EngineCore" in names and not workers, names
    assert "Reducing Torch threads" not in log and "torch.set_num_threads" not in log
    assert "Since VLLM_ENABLE_V1_MULTIPROCESSING" not in log
    # The compute threads are not cut to one: during a stream the EngineCore uses more than one core.
    core = next(p for p in server.process_tree() if p.name() == "VLLM::EngineCore")
    cpu_before, began = sum(core.cpu_times()[:2]), time.monotonic()
    response = httpx.post(server.url_for("v1", "completions"), timeout=120, json={
        "model": model_name, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True})
    assert response.status_code == 200, response.text
    cores_used = (sum(core.cpu_times()[:2]) - cpu_before) / (time.monotonic() - began)
    print(f"\nEngineCore during a 200-token answer: {cores_used:.2f} cores busy")
    assert cores_used > 1.2
    # Intel's OpenMP (cpu_defaults.engine_core_env_defaults), where pip installed it.
    if (Path(sys.prefix) / "lib" / "libiomp5.so").exists():
        assert "libiomp5" in Path(f"/proc/{core.pid}/maps").read_text()  # loaded first, its OpenMP symbols win
