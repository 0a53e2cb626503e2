"""Next-token selection for a decode batch, each row with its own SamplingParams.

Greedy rows take the argmax (first index on ties, as `model.generate`). Sampled rows draw
from their own seeded generator, so a sample's tokens do not depend on its batch mates.
"""

from __future__ import annotations

import torch

from .config import SamplingParams


def make_generator(params: SamplingParams, device: torch.device, fallback_seed: int) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else fallback_seed)
    return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(V,) float logits -> temperature-scaled logits with top-k / top-p exclusions set to -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def select_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    tokens = logits.argmax(dim=-1)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = filter_logits(logits[row].float(), p).softmax(-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens
