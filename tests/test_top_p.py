"""Top-p among the most probable tokens (streaming_tutorial/server/top_p.py) keeps the tokens vLLM's own full
sort keeps, and hands a flat distribution back to it. No server needed.

The two ways may part only at the nucleus' edge, where a token's probability-above is within `NUCLEUS_EDGE` of p:
there float32 sums in different orders round either way, and which way depends on the CPU's vector kernels
(AVX-512 and AVX2 machines round differently). `differences_beyond_the_edge` checks exactly that, and is itself
shown to catch a nucleus that is really different."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from vllm.v1.sample.ops import topk_topp_sampler as ops

from streaming_tutorial.server.top_p import NUCLEUS_EDGE, let_top_p_skip_the_full_sort, top_p_among_candidates

VOCAB = 49_152  # SmolLM2's


def vllms(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return ops.apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True)


def peaked(rows: int, temperature: float, seed: int) -> torch.Tensor:
    """Logits shaped like a language model's after the temperature: a few likely tokens, a long tail."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, VOCAB, generator=generator) * 2.5) / temperature


def differences_beyond_the_edge(logits: torch.Tensor, p: torch.Tensor, ours: torch.Tensor,
                                theirs: torch.Tensor) -> list[tuple[int, int, float]]:
    """(row, token, exact probability-above) of every token kept by one way and dropped by the other whose
    probability-above, computed in float64, is not within NUCLEUS_EDGE of its row's p."""
    parted = torch.isinf(ours) != torch.isinf(theirs)
    if not bool(parted.any()):
        return []
    probs = logits.double().softmax(dim=-1)
    ranked, order = probs.sort(dim=-1, descending=True)
    above = torch.empty_like(probs).scatter_(1, order, ranked.cumsum(dim=-1) - ranked)
    return [(row, token, above[row, token].item()) for row, token in parted.nonzero().tolist()
            if abs(above[row, token].item() - p[row].item()) > NUCLEUS_EDGE]


def check_the_kept_tokens(temperature: float, top_p: float, seeds: range = range(10)) -> list:
    """Every difference beyond the nucleus' edge between our nucleus and vLLM's, over `seeds`."""
    beyond = []
    for seed in seeds:
        logits = peaked(4, temperature, seed)
        p = torch.full((4,), top_p)
        ours = top_p_among_candidates(logits, p)
        assert ours is not None, "a nucleus of these distributions fits in the candidates"
        kept = ~torch.isinf(ours)
        assert torch.equal(ours[kept], logits[kept])  # the kept logits are untouched
        beyond += [(seed, *difference) for difference in differences_beyond_the_edge(logits, p, ours,
                                                                                      vllms(logits, p))]
    return beyond


@pytest.mark.parametrize("temperature", [0.2, 0.3, 0.4])  # the bundled model's default is 0.2
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_the_kept_tokens_are_the_ones_vllms_sort_keeps(temperature, top_p):
    assert check_the_kept_tokens(temperature, top_p) == []


def test_the_check_catches_a_nucleus_that_is_really_different():
    logits, p = peaked(4, 0.4, seed=6), torch.full((4,), 0.95)
    wider = top_p_among_candidates(logits, p + 0.02)  # a few more tokens than vLLM keeps
    beyond = differences_beyond_the_edge(logits, p, wider, vllms(logits, p))
    assert beyond and all(0.95 + NUCLEUS_EDGE < above < 0.97 for _, _, above in beyond)


# On any machine, the same check with torch's kernels for AVX2-only CPUs (most laptops): seed 6 at p 0.95 and
# temperature 0.4 has a token at the edge that AVX2's sums round the other way from vLLM's.
OTHER_KERNELS = """
import sys, torch
from tests.test_top_p import check_the_kept_tokens
assert torch.backends.cpu.get_cpu_capability() == sys.argv[1], torch.backends.cpu.get_cpu_capability()
beyond = [d for p in (0.9, 0.95) for d in check_the_kept_tokens(0.4, p)]
print(beyond)
sys.exit(1 if beyond else 0)
"""


@pytest.mark.parametrize("kernels", ["AVX2"])
def test_the_kept_tokens_agree_with_the_kernels_of_an_avx2_cpu(kernels):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", OTHER_KERNELS, kernels], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "ATEN_CPU_CAPABILITY": kernels.lower()}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_vllms_cpu_sampler_takes_the_short_way_once_installed(monkeypatch):
    monkeypatch.setattr(ops, "apply_top_k_top_p_pytorch", ops.apply_top_k_top_p_pytorch)  # restored afterwards
    logits, p = peaked(2, 0.2, seed=11), torch.tensor([0.9, 0.9])
    expected = vllms(logits, p)
    let_top_p_skip_the_full_sort()
    assert getattr(ops.apply_top_k_top_p_pytorch, "candidates", False)
    sorts = []
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(1) or torch.sort(self, *a, **k))
    ours = ops.apply_top_k_top_p(logits.clone(), None, p)  # what vLLM's CPU sampler calls
    assert torch.equal(torch.isinf(ours), torch.isinf(expected)) and not sorts
    ops.apply_top_k_top_p(torch.zeros(1, VOCAB), None, torch.tensor([0.9]))  # flat: vLLM's own sort
    assert sorts


def test_a_nucleus_beyond_the_candidates_falls_back_to_the_full_sort():
    flat = torch.zeros(2, VOCAB)  # every token equally likely: the 0.9 nucleus holds 44,237 tokens
    assert top_p_among_candidates(flat, torch.tensor([0.9, 0.9])) is None


def test_rows_without_top_p_pass_unchanged_beside_rows_with_it():
    logits = peaked(3, 0.2, seed=7)
    logits[1] = 0.0  # a flat row, but with p = 1 it needs no nucleus
    p = torch.tensor([0.9, 1.0, 0.8])
    ours = top_p_among_candidates(logits, p)
    assert ours is not None
    assert torch.equal(ours[1], logits[1])
    assert torch.equal(torch.isinf(ours), torch.isinf(vllms(logits, p)))


def test_the_most_probable_token_is_always_kept():
    logits = peaked(8, 0.05, seed=3)  # so peaked that the top token alone is over p
    ours = top_p_among_candidates(logits, torch.full((8,), 0.5))
    assert ours is not None
    assert torch.equal((~torch.isinf(ours)).sum(dim=1), torch.ones(8, dtype=torch.long))
    assert torch.equal(ours.argmax(dim=1), logits.argmax(dim=1))
