"""Per-sample statistics and how shared step time is attributed to samples.

A pack's vision-tower time is split in proportion to each sample's vision patches, its
prefill time (and the sparsification share of it) in proportion to each sample's prompt
tokens, and every decode step's time equally among the samples active in that step.
Summing a column over samples therefore gives the engine's wall time for that phase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SampleStats:
    n_prompt_tokens: int = 0
    n_visual_tokens: int = 0
    n_generated_tokens: int = 0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    sparse_ms: float = 0.0  # part of prefill_ms: raters, scores, selection, recycling, regathering
    decode_ms: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or a stop id) or "length" (max_new_tokens)
    # Sparsification (dense: kept = n_visual_tokens, equivalent = n_visual_tokens, no pruning layers)
    method: str = "none"  # SparsityConfig.label, e.g. "sparsevlm-128"
    n_visual_tokens_kept: int = 0  # visual tokens after the last pruning layer, merged ones included
    kept_per_pruning_layer: dict[int, int] = field(default_factory=dict)  # layer -> visual tokens it passed on
    equiv_visual_tokens: float = 0.0  # layer-averaged retained visual tokens (see pruning/schedule.py)
    budget_met: bool = True  # False: the preset's layer average cannot be reached at this model's depth
    prefill_flops: float = 0.0  # estimated decoder prefill FLOPs with this pruning ...
    prefill_flops_dense: float = 0.0  # ... and without (vision tower excluded in both)
    # indices into the sample's visual tokens that survived the last pruning layer (all when dense)
    kept_visual_positions: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def split_time(total_ms: float, weights: list[int]) -> list[float]:
    """Share `total_ms` in proportion to `weights` (equally if they are all zero)."""
    total = sum(weights)
    if total == 0:
        return [total_ms / len(weights)] * len(weights)
    return [total_ms * w / total for w in weights]
