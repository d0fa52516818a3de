"""A seeded request on a CPU must not stop vLLM 0.32's engine when its prompt is prefilled in several steps.

After a step that prefilled only part of a prompt (chunked prefill), vLLM throws away the token it sampled for
that request and rewinds the request's own random generator (`gen.set_offset(gen.get_offset() - 4)` in
`GPUModelRunner._bookkeeping_sync`, which the CPU runner inherits). Only CUDA's generator has an offset: a CPU
generator raises "CPU Generator does not use offset", and the engine dies with every stream on it. Any request
with a `seed` and a prompt longer than the prefill budget does it, and with this server's small budget on a CPU
(server/cpu_defaults.py, CPU_PREFILL_BUDGET) that is a prompt of a few paragraphs.

The fix, applied in the engine process on a CPU only: each request's generator is a `torch.Generator` whose
offset reads 0 and ignores being set, so the rewind does nothing. The thrown-away sample has then used up some
random numbers: a seeded answer depends on how its prompt was cut into steps (the budget, the other requests in
the batch, what the prefix cache already held), as it does with vLLM on a GPU only within a batch. On a GPU
nothing changes. vLLM 0.34's model runners seed each position instead and rewind nothing: there the seam
(server/seam.py) leaves this fix off, as not needed.
"""

from __future__ import annotations

import torch


class OffsetlessGenerator(torch.Generator):
    """A CPU generator that answers vLLM's offset calls: the offset is 0 and cannot be set."""

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> OffsetlessGenerator:
        return self


def offsetless(generator: torch.Generator | None) -> torch.Generator | None:
    """The same generator (same state), as an `OffsetlessGenerator` when it is a plain CPU one."""
    if generator is None or type(generator) is not torch.Generator or generator.device.type != "cpu":
        return generator
    replacement = OffsetlessGenerator(device="cpu")
    replacement.set_state(generator.get_state())
    return replacement


def let_seeded_prefill_chunks_rewind() -> None:
    """Give every request that joins the engine's batch an offsetless generator (see the module's docstring)."""
    from vllm.v1.worker.gpu_input_batch import InputBatch

    original = InputBatch.add_request
    if getattr(original, "offsetless", False):
        return

    def add_request(self, request, *args, **kwargs):
        request.generator = offsetless(request.generator)  # kept on the request too, for a preempted one's return
        return original(self, request, *args, **kwargs)

    add_request.offsetless = True
    InputBatch.add_request = add_request
