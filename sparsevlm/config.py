"""Engine-side configuration: small frozen dataclasses (the job-level pydantic config lives in schemas/)."""

from __future__ import annotations

from dataclasses import dataclass, field

SPARSITY_METHODS = ("none",)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sample. `temperature=0` is greedy.

    `seed` makes sampling reproducible per sample, independent of batch mates.
    `stop_token_ids` are added to the model's own end-of-sequence ids; the stop token
    itself is returned in `token_ids` (as `model.generate` does) and dropped from `text`.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SparsityConfig:
    """Which visual tokens to drop. `method="none"` keeps everything (dense)."""

    method: str = "none"

    def __post_init__(self) -> None:
        if self.method not in SPARSITY_METHODS:
            raise ValueError(
                f"SparsityConfig.method={self.method!r} is not available; choose one of {SPARSITY_METHODS}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """Execution limits of one engine (one GPU).

    max_prefill_tokens: tokens per packed prefill; a bigger batch is split into several
        packs (a single sample longer than this still runs alone, unsplit).
    max_num_seqs: samples decoded together; also bounds how many are admitted at once.
    max_cache_tokens: KV-cache slots per batch; None = `cache_memory_fraction` of the free
        GPU memory at the batch's start (1M tokens on CPU).
    attention_backend: "auto" (flash-attn, else torch varlen on CUDA, else SDPA) or a name.
    cuda_graphs: capture decode steps per batch-size bucket on CUDA.
    """

    max_prefill_tokens: int = 32768
    max_num_seqs: int = 128
    max_cache_tokens: int | None = None
    cache_memory_fraction: float = 0.6
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    graph_batch_buckets: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128))

    def __post_init__(self) -> None:
        if self.max_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("EngineConfig.max_prefill_tokens and max_num_seqs must be >= 1")
