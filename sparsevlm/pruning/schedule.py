"""Budgets to per-sample pruning plans, on the host, from counts alone.

A plan says, for one sample, after which layers visual tokens are pruned, how many are
kept, how many of the deleted ones are recycled into how many merged tokens, and so how
many visual tokens enter every layer. Everything here depends only on the sample's
visual-token count and the config, so packs can be laid out (and the KV cache sized)
before any GPU work, without host-device syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DEFAULT_PRESET, SparsityConfig

REFERENCE_VISUAL_TOKENS = 576  # LLaVA-1.5: the paper's table is for this many visual tokens ...
REFERENCE_LAYERS = 32  # ... and this many decoder layers
REFERENCE_PRUNING_LAYERS = (2, 6, 15)
PRESET_KEEP = {  # preset -> visual tokens kept after each of REFERENCE_PRUNING_LAYERS
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
_EPS = 1e-9  # floor(0.3 * 10) must be 3 even where 0.3 * 10 is 2.9999999999999996


@dataclass(frozen=True)
class PruneStep:
    layer: int  # prune the output of this 0-based decoder layer
    keep: int  # visual tokens kept (merged tokens from earlier steps count as visual)
    n_recycled: int  # deleted tokens that are clustered ...
    n_clusters: int  # ... into this many merged tokens


@dataclass(frozen=True)
class SamplePlan:
    num_visual_tokens: int
    steps: tuple[PruneStep, ...]
    visual_per_layer: tuple[int, ...]  # visual tokens each layer sees (and caches), merged included

    @property
    def retained_per_layer(self) -> tuple[int, ...]:
        """Visual tokens in each layer's output: what the layer passes on after its pruning."""
        return self.visual_per_layer[1:] + (self.final_visual,)

    @property
    def final_visual(self) -> int:
        last = self.steps[-1] if self.steps else None
        return last.keep + last.n_clusters if last else self.num_visual_tokens

    @property
    def equivalent_visual_tokens(self) -> float:
        """Layer-averaged retained visual tokens, the paper's "retain N" convention: the mean
        over layers of the visual tokens in each layer's output (a pruning layer counts with
        what it keeps). The 192 preset at 576 tokens / 32 layers gives 192.0. Compute is
        slightly higher because a pruning layer itself still runs on all its input; the FLOPs
        estimate (`prefill_flops`) uses what each layer really sees."""
        return sum(self.retained_per_layer) / len(self.retained_per_layer)


def scale_layer(layer: int, num_layers: int) -> int:
    """A layer of the 32-layer reference model at the same relative depth in `num_layers`."""
    return min(num_layers - 1, round(layer * num_layers / REFERENCE_LAYERS))


def _strictly_increasing(layers: list[int], num_layers: int) -> list[int]:
    out: list[int] = []
    for layer in layers:
        layer = max(layer, out[-1] + 1) if out else layer
        if layer < num_layers - 1:  # pruning after the last layer would save nothing
            out.append(layer)
    return out


def budget_schedule(config: SparsityConfig, num_layers: int, num_visual: int) -> list[tuple[int, int]]:
    """(layer, keep count) pairs for one sample, before recycling is accounted."""
    if not config.enabled or num_visual == 0:
        return []
    scale = num_visual / REFERENCE_VISUAL_TOKENS
    if config.schedule is not None:
        return [(layer, keep if isinstance(keep, int) else max(1, round(keep * num_visual)))
                for layer, keep in config.schedule if layer < num_layers - 1]
    first = scale_layer(REFERENCE_PRUNING_LAYERS[0], num_layers)
    if config.method in ("fastv", "random"):
        first = config.fastv_layer if config.fastv_layer is not None else first
        first = min(first, num_layers - 2)
    if config.keep_ratio is not None:
        return [(first, max(1, round(config.keep_ratio * num_visual)))]
    preset = config.preset or DEFAULT_PRESET
    if config.method in ("fastv", "random"):
        # One step at `first`, sized so the layer-averaged retained count is the preset's.
        target = preset * scale * num_layers
        keep = (target - first * num_visual) / (num_layers - first)
        return [(first, max(1, round(keep)))]
    layers = _strictly_increasing([scale_layer(layer, num_layers) for layer in REFERENCE_PRUNING_LAYERS], num_layers)
    return [(layer, max(1, round(keep * scale))) for layer, keep in zip(layers, PRESET_KEEP[preset])]


def recycled_counts(n_deleted: int, config: SparsityConfig) -> tuple[int, int]:
    """(tokens recycled, clusters) for `n_deleted` tokens: floor(tau n)+1 and floor(theta n_rec)+1."""
    if not config.recycles or n_deleted == 0:
        return 0, 0
    n_recycled = min(n_deleted, math.floor(config.tau * n_deleted + _EPS) + 1)
    return n_recycled, min(n_recycled, math.floor(config.theta * n_recycled + _EPS) + 1)


def plan_sample(config: SparsityConfig, num_layers: int, num_visual: int,
                keeps: list[int] | None = None) -> SamplePlan:
    """The plan of one sample. `keeps` overrides the budget's keep counts step by step (the
    rank-adaptive variant decides them on the device; the layers stay the budget's)."""
    budget = budget_schedule(config, num_layers, num_visual)
    steps, current = [], num_visual
    per_layer = [0] * num_layers
    previous_layer = -1
    for i, (layer, keep) in enumerate(budget):
        keep = min(keeps[i] if keeps is not None else keep, current)
        per_layer[previous_layer + 1:layer + 1] = [current] * (layer - previous_layer)
        n_recycled, n_clusters = recycled_counts(current - keep, config)
        steps.append(PruneStep(layer, keep, n_recycled, n_clusters))
        current = keep + n_clusters
        previous_layer = layer
    per_layer[previous_layer + 1:] = [current] * (num_layers - previous_layer - 1)
    return SamplePlan(num_visual, tuple(steps), tuple(per_layer))


def prefill_flops(text_config, num_text_tokens: int, visual_per_layer: tuple[int, ...]) -> float:
    """Estimated decoder FLOPs of one sample's prefill: projections and MLP (2 per weight per
    token) plus causal attention (2 n^2 Hq D per layer), plus the lm_head on the last token.
    The vision tower is not included: it runs on every patch whatever is pruned."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    weights_per_layer = d * head_dim * (2 * heads + 2 * kv_heads) + 3 * d * m
    total = 2.0 * d * text_config.vocab_size
    for visual in visual_per_layer:
        n = num_text_tokens + visual
        total += 2.0 * n * weights_per_layer + 2.0 * n * n * heads * head_dim
    return total
