"""Top-p among the most probable tokens (streaming_tutorial/server/top_p.py) keeps exactly the tokens vLLM's own
full sort keeps, and hands a flat distribution back to it. No server needed."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.sample.ops import topk_topp_sampler as ops

from streaming_tutorial.server.top_p import let_top_p_skip_the_full_sort, top_p_among_candidates

VOCAB = 49_152  # SmolLM2's


def vllms(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return ops.apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True)


def peaked(rows: int, temperature: float, seed: int) -> torch.Tensor:
    """Logits shaped like a language model's after the temperature: a few likely tokens, a long tail."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, VOCAB, generator=generator) * 2.5) / temperature


@pytest.mark.parametrize("temperature", [0.2, 0.3, 0.4])  # the bundled model's default is 0.2
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_the_kept_tokens_are_the_ones_vllms_sort_keeps(temperature, top_p):
    for seed in range(10):
        logits = peaked(4, temperature, seed)
        p = torch.full((4,), top_p)
        ours = top_p_among_candidates(logits, p)
        assert ours is not None, "a nucleus of these distributions fits in the candidates"
        theirs = vllms(logits, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (seed, temperature, top_p)
        kept = ~torch.isinf(ours)
        assert torch.equal(ours[kept], logits[kept])  # the kept logits are untouched


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
