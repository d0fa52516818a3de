"""A CPU server saves its compiled model and reuses it on the next start (streaming_tutorial/compile_cache.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch.compiler

from streaming_tutorial import compile_cache


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
