"""Budgets to per-sample pruning plans, on the host, from counts alone.

A plan says, for one sample, after which layers visual tokens are pruned, how many are
kept, how many of the deleted ones are recycled into how many merged tokens, and so how
many visual tokens enter every layer. Everything here depends only on the sample's
visual-token count and the config, so packs can be laid out (and the KV cache sized)
before any GPU work, without host-device syncs.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from ..config import DEFAULT_PRESET, SparsityConfig

logger = logging.getLogger(__name__)

REFERENCE_VISUAL_TOKENS = 576  # LLaVA-1.5: the paper's table is for this many visual tokens ...
REFERENCE_LAYERS = 32  # ... and this many decoder layers
REFERENCE_PRUNING_LAYERS = (2, 6, 15)
FASTV_REFERENCE_LAYER = 2  # FastV's K: it prunes after layer 2 of 32
# The reference scores its first prune on layer 2's attention, after two layers have mixed the
# tokens; on layer 0 (un-mixed embeddings) the choice is no better than chance. Mapped schedules
# never prune before this layer (an explicit `schedule` may).
MIN_FIRST_PRUNING_LAYER = 2
PRESET_KEEP = {  # SparseVLM (v1 / v1.5): preset -> visual tokens kept after each REFERENCE_PRUNING_LAYERS
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
PRESET_KEEP_V2 = {  # SparseVLM+ (official v2.0 code), same layers
    192: (300, 200, 110),
    128: (238, 108, 60),
    96: (246, 54, 28),
    64: (66, 34, 20),
}
_EPS = 1e-9  # floor(0.3 * 10) must be 3 even where 0.3 * 10 is 2.9999999999999996
BUDGET_TOLERANCE = 0.02  # a layer average up to 2% over the preset's counts as met (keeps are whole tokens)


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
    target_equivalent: float | None = None  # the layer average a preset asks for (None: no preset)

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

    @property
    def budget_met(self) -> bool:
        """False where the preset's layer average cannot be reached at this depth (its dense
        layers alone exceed it): the plan then keeps the reference's counts and is over budget."""
        target = self.target_equivalent
        return target is None or self.equivalent_visual_tokens <= target * (1 + BUDGET_TOLERANCE) + 0.5


def map_layer(layer: int, num_layers: int) -> int:
    """The layer of a `num_layers` model after which the same share of the depth has run as after
    `layer` of the 32-layer reference ((layer + 1) / 32 of it), never before MIN_FIRST_PRUNING_LAYER."""
    return max(MIN_FIRST_PRUNING_LAYER, round((layer + 1) * num_layers / REFERENCE_LAYERS) - 1)


def _strictly_increasing(layers: list[int], num_layers: int) -> list[int]:
    out: list[int] = []
    for layer in layers:
        layer = max(layer, out[-1] + 1) if out else layer
        if layer < num_layers - 1:  # pruning after the last layer would save nothing
            out.append(layer)
    return out


def first_pruning_layer(config: SparsityConfig, num_layers: int) -> int | None:
    """Where a one-step method (fastv, random) or a keep_ratio budget prunes; None on a model too
    shallow to prune there (pruning after the last layer would save nothing)."""
    if config.method in ("fastv", "random") and config.fastv_layer is not None:
        layer = config.fastv_layer
    else:
        reference = FASTV_REFERENCE_LAYER if config.method in ("fastv", "random") else REFERENCE_PRUNING_LAYERS[0]
        layer = map_layer(reference, num_layers)
    return layer if layer < num_layers - 1 else None


def budget_target(config: SparsityConfig, num_visual: int) -> float | None:
    """The layer-averaged visual tokens a preset asks for: the preset scaled to this sample's
    visual tokens (the paper's "retain N" at 576 tokens), dense layers included."""
    if not config.enabled or config.schedule is not None or config.keep_ratio is not None:
        return None
    return (config.preset or DEFAULT_PRESET) * num_visual / REFERENCE_VISUAL_TOKENS


def budget_schedule(config: SparsityConfig, num_layers: int, num_visual: int) -> list[tuple[int, int]]:
    """(layer, keep count) pairs for one sample, before recycling is accounted."""
    return list(_budget_schedule(config, num_layers, num_visual))


@functools.lru_cache(maxsize=4096)
def _budget_schedule(config: SparsityConfig, num_layers: int, num_visual: int) -> tuple[tuple[int, int], ...]:
    if not config.enabled or num_visual == 0:
        return ()
    if config.schedule is not None:
        return tuple((layer, keep if isinstance(keep, int) else max(1, round(keep * num_visual)))
                     for layer, keep in config.schedule if layer < num_layers - 1)
    first = first_pruning_layer(config, num_layers)
    if config.keep_ratio is not None:
        return () if first is None else ((first, max(1, round(config.keep_ratio * num_visual))),)
    preset = config.preset or DEFAULT_PRESET
    target = budget_target(config, num_visual)
    if config.method in ("fastv", "random"):
        # One step, sized so that the layer average (dense layers included) is the target; out of
        # reach, the count the reference depth would keep
        if first is None:
            return ()
        keep = (target * num_layers - first * num_visual) / (num_layers - first)
        if keep < 1:
            dense = FASTV_REFERENCE_LAYER
            keep = (target * REFERENCE_LAYERS - dense * num_visual) / (REFERENCE_LAYERS - dense)
        return ((first, min(num_visual, max(1, round(keep)))),)
    table = PRESET_KEEP_V2 if config.method == "sparsevlm_v2" else PRESET_KEEP
    reference = table[preset]
    scale = num_visual / REFERENCE_VISUAL_TOKENS
    if num_layers == REFERENCE_LAYERS:  # the paper's own setting: its table, as written
        return tuple(zip(REFERENCE_PRUNING_LAYERS, (max(1, round(keep * scale)) for keep in reference)))
    layers = _strictly_increasing([map_layer(layer, num_layers) for layer in REFERENCE_PRUNING_LAYERS], num_layers)
    if not layers:  # too shallow to prune after layer 2: dense, flagged by the plan
        return ()
    reference = reference[:len(layers)]

    def keeps(alpha: float) -> list[int]:
        return [min(num_visual, max(1, round(alpha * keep * scale))) for keep in reference]

    def average(alpha: float) -> float:
        return _plan(config, num_layers, num_visual, list(zip(layers, keeps(alpha)))).equivalent_visual_tokens

    # The reference's shape scaled by one factor, found by bisection (the average grows with it),
    # so that the layer average meets the target here. Out of reach (even one token a step passes
    # it), the reference's own counts: over budget on average, never under it in final tokens.
    low, high = 0.0, num_visual / (min(reference) * scale)
    if average(low) > target:
        return tuple(zip(layers, keeps(1.0)))
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) <= target else (low, middle)
    return tuple(zip(layers, keeps(low)))


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
    if keeps is not None:
        budget = [(layer, keep) for (layer, _), keep in zip(budget, keeps)]
    plan = _plan(config, num_layers, num_visual, budget)
    target = budget_target(config, num_visual)
    if target is not None:
        plan = SamplePlan(plan.num_visual_tokens, plan.steps, plan.visual_per_layer, target)
        if not plan.budget_met:
            _warn_unmet(config.label, num_layers, num_visual, target, plan.equivalent_visual_tokens)
    return plan


def _plan(config: SparsityConfig, num_layers: int, num_visual: int, budget: list[tuple[int, int]]) -> SamplePlan:
    steps, current = [], num_visual
    per_layer = [0] * num_layers
    previous_layer = -1
    for layer, keep in budget:
        keep = min(keep, current)
        per_layer[previous_layer + 1:layer + 1] = [current] * (layer - previous_layer)
        n_recycled, n_clusters = recycled_counts(current - keep, config)
        steps.append(PruneStep(layer, keep, n_recycled, n_clusters))
        current = keep + n_clusters
        previous_layer = layer
    per_layer[previous_layer + 1:] = [current] * (num_layers - previous_layer - 1)
    return SamplePlan(num_visual, tuple(steps), tuple(per_layer))


@functools.lru_cache(maxsize=256)
def _warn_unmet(label: str, num_layers: int, num_visual: int, target: float, reached: float) -> None:
    """Once per (config, depth, size): the user asked for less than this model can give."""
    logger.warning("%s asks for a layer average of %.1f of %d visual tokens, but this %d-layer model "
                   "keeps them all for its first %d layers: running the paper's keep counts instead, a "
                   "layer average of %.1f (stats: budget_met=False). Give a `schedule` to prune earlier.",
                   label, target, num_visual, num_layers, MIN_FIRST_PRUNING_LAYER, reached)


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
