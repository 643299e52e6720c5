"""Seeded sampling: exact samples from the filtered softmax, repeatable per seed, independent across seeds."""

from __future__ import annotations

import math

import pytest
import torch

from muffin.decoding import Decoding, SeededSamplingProcessor, counter_uniform


def test_counter_uniform_is_a_pure_function() -> None:
    a = counter_uniform(torch.tensor([1, 2, 3]), 5, 1000)
    b = counter_uniform(torch.tensor([3, 2]), 5, 1000)
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])  # row depends on its own seed only
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(counter_uniform(torch.tensor([1]), 6, 1000)[0], a[0])
    assert 0 < a.min() and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.03  # mean of 3000 U(0,1): sd 0.0053
    assert abs((a < 0.25).double().mean().item() - 0.25) < 0.04


def test_gumbel_argmax_samples_the_softmax() -> None:
    """Frequencies of 4000 seeded draws match softmax([0, 1, 2] / 0.7) within 4 standard errors."""
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(4000, 1)
    proc = SeededSamplingProcessor(list(range(4000)), temperature=0.7)
    picks = proc(torch.zeros(4000, 1, dtype=torch.long), logits).argmax(-1)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]) / 0.7, -1)
    for k in range(3):
        freq = (picks == k).double().mean().item()
        se = math.sqrt(p[k] * (1 - p[k]) / 4000)
        assert abs(freq - p[k].item()) < 4 * se


def test_top_k_and_top_p_filter() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(500, 1)
    picks = SeededSamplingProcessor(list(range(500)), top_k=2)(torch.zeros(500, 1, dtype=torch.long), logits).argmax(
        -1
    )
    assert set(picks.tolist()) == {0, 1}
    # top_p 0.7: smallest set with mass >= 0.7 is {0.5, 0.3}
    picks = SeededSamplingProcessor(list(range(500)), top_p=0.7)(torch.zeros(500, 1, dtype=torch.long), logits).argmax(
        -1
    )
    assert set(picks.tolist()) == {0, 1}


def test_decoding_validation() -> None:
    with pytest.raises(ValueError, match="temperature > 0"):
        Decoding(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Decoding(max_new_tokens=0)
    assert Decoding(num_beams=3).to_generate_kwargs() == {"max_new_tokens": 512, "num_beams": 3, "do_sample": False}
