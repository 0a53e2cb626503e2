"""Engine-side configuration: small frozen dataclasses (the job-level pydantic config lives in schemas/)."""

from __future__ import annotations

from dataclasses import dataclass, field

SPARSITY_METHODS = ("none", "sparsevlm", "sparsevlm_v2", "fastv", "random")
PRESETS = (64, 96, 128, 192)


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
    """Which visual tokens to drop, and when (see ../shared/design/SPARSEVLM.md and the README).

    method: "none" (dense), "sparsevlm", "sparsevlm_v2" (SparseVLM+: RoPE-prior correction,
        top-half heads, no recycling), "fastv" (last prompt token's attention at one layer),
        "random" (seeded uniform subset, same budget).
    Budget, at most one of:
        preset: 64 / 96 / 128 / 192, the paper's per-layer keep table (LLaVA: 576 visual
            tokens, 32 layers), scaled to each sample's visual-token count and the model's depth.
        keep_ratio: keep this fraction of the visual tokens (at the method's pruning layers).
        schedule: {layer: keep} pruning after those 0-based layers; keep is a count (int)
            or a fraction of the sample's visual tokens (float in (0, 1]).
        Default when none is given: preset 128.
    recycle: merge part of what is deleted into new tokens (default: on for sparsevlm, off
        otherwise); tau = share of deleted tokens recycled, theta = clusters per recycled token.
    rank_adaptive: sparsevlm keeps floor(rank_scale * rank(R) + rank_bias) tokens (capped by
        the budget) instead of the budget itself, R being the raters' attention on visual tokens.
    fastv_layer: the layer fastv and random prune after with preset/keep_ratio budgets
        (default: layer 2 of 32, scaled to the model's depth).
    seed: the random method's seed (a sample's subset also depends on its own tokens only,
        never on its batch mates).
    """

    method: str = "none"
    preset: int | None = None
    keep_ratio: float | None = None
    schedule: tuple[tuple[int, int | float], ...] | dict | None = None
    recycle: bool | None = None
    tau: float = 0.3
    theta: float = 0.1
    rank_adaptive: bool = False
    rank_scale: float = 8.0
    rank_bias: float = 0.0
    fastv_layer: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SPARSITY_METHODS:
            raise ValueError(
                f"SparsityConfig.method={self.method!r} is not available; choose one of {SPARSITY_METHODS}"
            )
        budgets = [name for name in ("preset", "keep_ratio", "schedule") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise ValueError(f"SparsityConfig: give one budget, not {' and '.join(budgets)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"SparsityConfig.preset={self.preset} is not a preset; choose one of {PRESETS} "
                             "or give keep_ratio / schedule")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise ValueError(f"SparsityConfig.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.schedule is not None:
            items = self.schedule.items() if isinstance(self.schedule, dict) else self.schedule
            schedule = tuple(sorted((int(layer), keep) for layer, keep in items))
            for layer, keep in schedule:
                if layer < 0:
                    raise ValueError(f"SparsityConfig.schedule: layer {layer} must be >= 0")
                if isinstance(keep, bool) or not isinstance(keep, (int, float)):
                    raise ValueError(f"SparsityConfig.schedule[{layer}] must be a count or a ratio, got {keep!r}")
                if isinstance(keep, float) and not 0 < keep <= 1:
                    raise ValueError(f"SparsityConfig.schedule[{layer}]={keep}: a ratio must be in (0, 1]")
                if isinstance(keep, int) and keep < 0:
                    raise ValueError(f"SparsityConfig.schedule[{layer}]={keep}: a count must be >= 0")
            if len({layer for layer, _ in schedule}) != len(schedule):
                raise ValueError("SparsityConfig.schedule names a layer twice")
            object.__setattr__(self, "schedule", schedule)
        if not 0 <= self.tau <= 1 or not 0 < self.theta <= 1:
            raise ValueError(f"SparsityConfig: tau must be in [0, 1] and theta in (0, 1], got {self.tau}, {self.theta}")
        if self.rank_adaptive and self.method != "sparsevlm":
            raise ValueError("SparsityConfig.rank_adaptive applies to method='sparsevlm' only")
        if self.recycle and self.method not in ("sparsevlm", "sparsevlm_v2"):
            raise ValueError(f"SparsityConfig.recycle applies to sparsevlm methods, not {self.method!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def recycles(self) -> bool:
        return self.recycle if self.recycle is not None else self.method == "sparsevlm"

    @property
    def label(self) -> str:
        """Short name for tables: method plus budget, e.g. "sparsevlm-128", "fastv-r0.25"."""
        if not self.enabled:
            return "none"
        if self.keep_ratio is not None:
            return f"{self.method}-r{self.keep_ratio:g}"
        if self.schedule is not None:
            return f"{self.method}-" + ",".join(f"{layer}:{keep:g}" for layer, keep in self.schedule)
        return f"{self.method}-{self.preset or DEFAULT_PRESET}"


DEFAULT_PRESET = 128


@dataclass(frozen=True)
class EngineConfig:
    """Execution limits of one engine (one GPU).

    max_prefill_tokens: tokens per packed prefill; a bigger batch is split into several
        packs (a single sample longer than this still runs alone, unsplit).
    max_num_seqs: samples decoded together; also bounds how many are admitted at once.
    max_cache_tokens: KV-cache slots per batch; None = `cache_memory_fraction` of the free
        GPU memory at the batch's start (1M tokens on CPU).
    gpu_share: the part of the GPU's memory this engine may take (several engines on one GPU:
        each sizes its KV pool inside its share, not from what the others left free).
    attention_backend: "auto" (flash-attn, else torch varlen on CUDA, else SDPA) or a name.
    cuda_graphs: capture decode steps per batch-size bucket on CUDA.
    compile_vision: torch.compile the vision tower's blocks on CUDA (fuses its fp32 norms and
        rotary math; the first batch pays the compilation).
    """

    max_prefill_tokens: int = 32768
    max_num_seqs: int = 128
    max_cache_tokens: int | None = None
    cache_memory_fraction: float = 0.6
    gpu_share: float = 1.0
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    compile_vision: bool = True
    graph_batch_buckets: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128))

    def __post_init__(self) -> None:
        if self.max_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("EngineConfig.max_prefill_tokens and max_num_seqs must be >= 1")
        if not 0 < self.gpu_share <= 1:
            raise ValueError(f"EngineConfig.gpu_share must be in (0, 1], got {self.gpu_share}")
