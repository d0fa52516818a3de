"""Top-p sampling on a CPU without sorting the whole vocabulary at every step.

vLLM 0.32's CPU sampler applies top-p (the bundled model's default: top-p 0.9 at temperature 0.2) by sorting
every row of logits over the whole vocabulary (49,152 tokens for SmolLM2), at every step: 2.7 ms of a 21.9 ms
step for one stream, in a torch profile of this server (docs/benchmarks.md), and one more sort per stream in a
batch. Yet the nucleus is almost always a handful of tokens.

So, applied in the engine process on a CPU only: take the `CANDIDATES` most probable tokens of each row
(`torch.topk`, a partial selection) and find the nucleus among them. A token outside them is dropped by
vLLM's rule too whenever the candidates already hold probability p. vLLM keeps a token when the probability of
the tokens ranked above it is below p, which is the same test in the other order. Where a row's nucleus might
reach beyond the candidates (a flat distribution, a high temperature), the whole batch takes vLLM's own sort.
The kept tokens are vLLM's, up to the order among tokens of exactly equal logits and rounding at the nucleus'
edge (`NUCLEUS_EDGE`): both ways sum float32 probabilities, in other orders, with the CPU's own vector kernels.
Rows without top-p (p = 1) pass unchanged; top-k, alone or with top-p, stays vLLM's. On a GPU nothing changes.
"""

from __future__ import annotations

import torch

# Enough for any nucleus of a peaked distribution; more costs little (topk of 256 of 49,152 is a fraction of a
# millisecond) but a flat distribution needs thousands, and then the full sort is the right tool anyway.
CANDIDATES = 256

# How far from p a token's probability-above may be and still be kept by one way and dropped by the other. The
# float32 softmax over 49,152 logits and the running sums put either way's sums up to 1.7e-5 from the exact ones
# (measured against float64 on AVX-512, AVX2 and scalar kernels, `ATEN_CPU_CAPABILITY`); this allows for both.
NUCLEUS_EDGE = 1e-4


def top_p_among_candidates(logits: torch.Tensor, p: torch.Tensor,
                           candidates: int = CANDIDATES) -> torch.Tensor | None:
    """`logits` with every token outside each row's top-p nucleus set to -inf, as a new tensor; or None when a
    row's nucleus may hold more than `candidates` tokens (then the caller sorts)."""
    limited = p < 1
    count = min(candidates, logits.shape[-1])
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    top, index = probs.topk(count, dim=-1)  # descending
    if bool((top.sum(dim=-1)[limited] < p[limited]).any()):
        return None
    above = top.cumsum(dim=-1) - top  # the probability of the candidates ranked above each one
    drop = above >= p.unsqueeze(1)  # vLLM: the ascending cumulative sum is <= 1 - p (the top token never)
    kept = torch.full_like(logits, float("-inf"))
    kept.scatter_(1, index, logits.gather(1, index).masked_fill_(drop, float("-inf")))
    if not bool(limited.all()):
        kept[~limited] = logits[~limited]
    return kept


def let_top_p_skip_the_full_sort() -> None:
    """Route vLLM's CPU top-p (top-p alone) through `top_p_among_candidates` (see the module's docstring).
    Installed by the seam (server/seam.py), in the engine process, where it verified that vLLM calls this name."""
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    original = ops.apply_top_k_top_p_pytorch
    if getattr(original, "candidates", False):
        return

    def apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=False):
        if p is not None and k is None and logits.device.type == "cpu":
            kept = top_p_among_candidates(logits, p)
            if kept is not None:
                return kept
        return original(logits, k, p, allow_cpu_sync=allow_cpu_sync)

    apply_top_k_top_p_pytorch.candidates = True
    ops.apply_top_k_top_p_pytorch = apply_top_k_top_p_pytorch
