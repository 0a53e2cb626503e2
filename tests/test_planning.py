"""Host-side planning and sampling helpers against plain reference code."""

from __future__ import annotations

import random

import pytest
import torch

from sparsevlm.config import SamplingParams
from sparsevlm.packing import group_consecutive
from sparsevlm.sampling import filter_logits


@pytest.mark.parametrize("seed", range(20))
def test_group_consecutive_respects_limits(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 50) for _ in range(rng.randint(1, 40))]
    max_items, max_total = rng.randint(1, 8), rng.randint(1, 120)
    groups = group_consecutive(sizes, max_items, max_total)
    assert [i for g in groups for i in g] == list(range(len(sizes)))  # every item once, in order
    for group in groups:
        assert len(group) <= max_items
        assert len(group) == 1 or sum(sizes[i] for i in group) <= max_total
    for a, b in zip(groups, groups[1:]):  # greedy: the next item did not fit
        assert len(a) == max_items or sum(sizes[i] for i in a) + sizes[b[0]] > max_total


def naive_filter(logits, temperature, top_k, top_p):
    logits = logits / temperature
    keep = set(range(len(logits)))
    order = sorted(range(len(logits)), key=lambda i: -logits[i].item())
    if top_k:
        keep &= set(order[:top_k])
    if top_p < 1:
        probs = torch.softmax(logits, -1)
        chosen, mass = set(), 0.0
        for i in order:
            chosen.add(i)
            mass += probs[i].item()
            if mass >= top_p:
                break
        keep &= chosen
    return torch.tensor([logits[i].item() if i in keep else float("-inf") for i in range(len(logits))])


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (10, 0.5), (3, 0.99)])
def test_filter_logits_matches_naive(top_k, top_p):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(top_k))
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(filter_logits(logits, params), naive_filter(logits, 0.7, top_k, top_p))
