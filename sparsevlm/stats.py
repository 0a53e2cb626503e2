"""Per-sample statistics and how shared step time is attributed to samples.

A pack's vision-tower time is split in proportion to each sample's vision patches, its
prefill time in proportion to each sample's prompt tokens, and every decode step's time
equally among the samples active in that step. Summing a column over samples therefore
gives the engine's wall time for that phase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SampleStats:
    n_prompt_tokens: int = 0
    n_visual_tokens: int = 0
    n_generated_tokens: int = 0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or a stop id) or "length" (max_new_tokens)

    def as_dict(self) -> dict:
        return asdict(self)


def split_time(total_ms: float, weights: list[int]) -> list[float]:
    """Share `total_ms` in proportion to `weights` (equally if they are all zero)."""
    total = sum(weights)
    if total == 0:
        return [total_ms / len(weights)] * len(weights)
    return [total_ms * w / total for w in weights]
