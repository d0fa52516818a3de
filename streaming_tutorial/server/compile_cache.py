"""Lets vLLM 0.32 reuse its saved compiled model on a CPU, so that a restart is fast *and* compiled.

vLLM saves the model's torch.compile'd forward pass ("AOT compile", on by default with torch >= 2.10) under
~/.cache/vllm, and on the next start with the same settings loads it instead of compiling again. On a CPU
that load always failed, so every start compiled again (minutes on a small CPU, against seconds to load): after
loading, vLLM calls `finalize_loading()`, a method of its own compiled-function class, but a CPU engine
compiles with plain inductor, whose loaded function (`BundledAOTAutogradSerializableCallable`) lacks it.
It needs no finalizing either: it is complete once deserialized. vLLM logged "Compiling model again due to a
load failure ... 'function' object has no attribute 'finalize_loading'".
"""

from __future__ import annotations

import functools

import torch.compiler


def _nothing_to_finalize(*args, **kwargs) -> None:
    pass


def let_inductor_artifacts_load() -> None:
    """Wrap `torch.compiler.load_compiled_function` (which vLLM calls by that name) so that a loaded function
    without `finalize_loading` gets a no-op one. Where the method exists (vLLM's own class, as on a GPU)
    nothing changes. Calling this twice wraps once. Installed by the seam (server/seam.py), in every process."""
    load = torch.compiler.load_compiled_function
    if getattr(load, "lets_inductor_artifacts_load", False):
        return

    @functools.wraps(load)
    def load_compiled_function(*args, **kwargs):
        loaded = load(*args, **kwargs)
        compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            compiled.finalize_loading = _nothing_to_finalize
        return loaded

    load_compiled_function.lets_inductor_artifacts_load = True
    torch.compiler.load_compiled_function = load_compiled_function
