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


DEFAULT_PRESET = 128
_KNOBS = {  # label option -> (field, parse); written after the budget as +name=value when not the default
    "tau": ("tau", float), "theta": ("theta", float), "rank_adaptive": ("rank_adaptive", "bool"),
    "rank_scale": ("rank_scale", float), "rank_bias": ("rank_bias", float), "fastv_layer": ("fastv_layer", int),
    "recycle": ("recycle", "bool"), "seed": ("seed", int),
}
_BOOLS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}
LABEL_GRAMMAR = ("none, or <method>[-<budget>][+<option>=<value>...]: budget a preset (64, 96, 128, 192), "
                 "r<ratio> (r0.25) or a schedule <layer>:<count or r<ratio>>,... (2:300,6:r0.2); options "
                 + ", ".join(_KNOBS))


@dataclass(frozen=True)
class SparsityConfig:
    """Which visual tokens to drop, and when (see ../shared/design/SPARSEVLM.md and the README).

    method: "none" (dense), "sparsevlm", "sparsevlm_v2" (SparseVLM+ as the official v2.0 code:
        RoPE-prior correction, heads ranked by corrected mass, its own keep table, no recycling),
        "fastv" (last prompt token's attention at one layer), "random" (seeded uniform subset,
        placed and sized like fastv).
    Budget, at most one of:
        preset: 64 / 96 / 128 / 192, the paper's per-layer keep table (LLaVA: 576 visual
            tokens, 32 layers), mapped to each sample's visual-token count and the model's
            depth so that the layer-averaged count matches the reference's (schedule.py).
        keep_ratio: keep this fraction of the visual tokens (at the method's first pruning layer).
        schedule: {layer: keep} pruning after those 0-based layers; keep is a count (int)
            or a fraction of the sample's visual tokens (float in (0, 1]). Taken as written.
        Default for a pruning method when none is given: preset 128.
    recycle: merge part of what is deleted into new tokens (default: on for sparsevlm, off
        otherwise); tau = share of deleted tokens recycled, theta = clusters per recycled token.
    rank_adaptive: sparsevlm keeps floor(rank_scale * rank(R) + rank_bias) tokens (capped by
        the budget) instead of the budget itself, R being the raters' attention on visual tokens
        (13.5: the official code's scale).
    fastv_layer: the layer fastv and random prune after with preset/keep_ratio budgets
        (default: FastV's K=2 of 32, mapped to the model's depth, never before layer 2).
    seed: the random method's seed (a sample's subset also depends on its own tokens only,
        never on its batch mates).

    `label` names a config in one string and `SparsityConfig.parse(label)` reads it back
    (LABEL_GRAMMAR): "sparsevlm-128", "fastv-r0.25", "sparsevlm-2:300,6:200,15:110+recycle=off".
    """

    method: str = "none"
    preset: int | None = None
    keep_ratio: float | None = None
    schedule: tuple[tuple[int, int | float], ...] | dict | None = None
    recycle: bool | None = None
    tau: float = 0.3
    theta: float = 0.1
    rank_adaptive: bool = False
    rank_scale: float = 13.5
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
        if self.fastv_layer is not None and self.fastv_layer < 0:
            raise ValueError(f"SparsityConfig.fastv_layer must be >= 0, got {self.fastv_layer}")
        if self.rank_adaptive and self.method != "sparsevlm":
            raise ValueError("SparsityConfig.rank_adaptive applies to method='sparsevlm' only")
        if self.recycle and self.method not in ("sparsevlm", "sparsevlm_v2"):
            raise ValueError(f"SparsityConfig.recycle applies to sparsevlm methods, not {self.method!r}")
        # one spelling of each default, so that a label reads back as an equal config
        if self.enabled and not budgets:
            object.__setattr__(self, "preset", DEFAULT_PRESET)
        if self.recycle is None:
            object.__setattr__(self, "recycle", self.method == "sparsevlm")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def recycles(self) -> bool:
        return bool(self.recycle)

    @property
    def label(self) -> str:
        """The config in one string (LABEL_GRAMMAR), e.g. "sparsevlm-128", "fastv-r0.25"; options
        appear only where they differ from the defaults."""
        if not self.enabled:
            return "none"
        if self.keep_ratio is not None:
            budget = f"r{self.keep_ratio!r}"
        elif self.schedule is not None:
            budget = ",".join(f"{layer}:{_keep_text(keep)}" for layer, keep in self.schedule)
        else:
            budget = str(self.preset)
        options = []
        for name, (field_name, _) in _KNOBS.items():
            value = getattr(self, field_name)
            default = type(self).__dataclass_fields__[field_name].default
            if field_name == "recycle":
                default = self.method == "sparsevlm"
            if value != default:
                options.append(f"+{name}=" + (("on" if value else "off") if isinstance(value, bool) else repr(value)))
        return f"{self.method}-{budget}" + "".join(options)

    @classmethod
    def parse(cls, label: str) -> "SparsityConfig":
        """The config a `label` names (its inverse; also reads the older "fastv-0.25" form)."""
        return cls(**parse_label(label))


def _keep_text(keep: int | float) -> str:
    return f"r{keep!r}" if isinstance(keep, float) else str(keep)


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"sparsity label: {what} {text!r} is not a{'n integer' if kind is int else ' number'}; "
                         f"labels are {LABEL_GRAMMAR}") from None


def _parse_keep(text: str, what: str) -> int | float:
    if text.startswith("r"):
        return _number(text[1:], float, what)
    return _number(text, float, what) if "." in text else _number(text, int, what)


def parse_schedule(text: str) -> dict[int, int | float]:
    """"2:300,6:r0.5" -> {2: 300, 6: 0.5}: after layer 2 keep 300 visual tokens, after 6 half of them."""
    steps = [step.strip().partition(":") for step in text.split(",")]
    if not all(sep for _, sep, _ in steps):
        raise ValueError(f"schedule {text!r}: write <layer>:<count or r<ratio>>,... e.g. 2:300,6:r0.5")
    return {_number(layer, int, "schedule layer"): _parse_keep(keep, "schedule keep") for layer, _, keep in steps}


def parse_label(label: str) -> dict:
    """The SparsityConfig fields a label states (only those): "sparsevlm-128+tau=0.2" ->
    {"method": "sparsevlm", "preset": 128, "tau": 0.2}."""
    head, *options = label.strip().split("+")
    method, _, budget = head.partition("-")
    if method not in SPARSITY_METHODS:
        raise ValueError(f"sparsity label {label!r}: unknown method {method!r}; labels are {LABEL_GRAMMAR}")
    fields: dict = {"method": method}
    if method == "none" and (budget or options):
        raise ValueError(f"sparsity label {label!r}: 'none' takes no budget or options")
    if ":" in budget:
        fields["schedule"] = parse_schedule(budget)
    elif budget.startswith("r"):
        fields["keep_ratio"] = _number(budget[1:], float, "keep ratio")
    elif budget:
        number = _number(budget, float, "budget")
        fields["preset" if number > 1 else "keep_ratio"] = int(number) if number > 1 else number
    for option in options:
        name, _, value = option.partition("=")
        if name not in _KNOBS or not value:
            raise ValueError(f"sparsity label {label!r}: unknown option {option!r}; labels are {LABEL_GRAMMAR}")
        field_name, kind = _KNOBS[name]
        if kind == "bool":
            if value.lower() not in _BOOLS:
                raise ValueError(f"sparsity label {label!r}: {name} takes on or off, not {value!r}")
            fields[field_name] = _BOOLS[value.lower()]
        else:
            fields[field_name] = _number(value, kind, name)
    return fields




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
    compile_vision: torch.compile the vision tower's blocks on CUDA (Qwen's blocks, CLIP's and
        SigLIP's encoder layers: fuses their norms, activations and rotary math; the first batch
        pays the compilation; a compiler failure falls back to the model's own, logged).
    compile_decode: torch.compile the decoder layers for decode steps on CUDA (fuses each
        layer's norms, rotary and activation; start-up pays the compilation, the decode graphs
        replay the result).
    decode_ahead: queue each decode step before the host has read the previous one's tokens
        (its inputs come from that step's output on the device; sparsevlm/decoding.py), so the GPU
        does not wait while the host commits tokens and schedules. Nothing is queued when the
        scheduler expects newcomers next; a sequence that stops on a stop token costs a wasted
        row, and newcomers let in by such a stop a wasted step. None (the default): on CUDA only,
        since on the CPU the queued step runs before `decode` returns, so there is nothing to
        overlap and only the waste is left (a probe test ran 18% longer with it).
    prepare_ahead: `generate` prepares its samples (checks, M-RoPE positions, pinned pixels: ~1 ms
        each on the host) on a worker thread, in order, while the device runs the packs queued
        before them (sparsevlm/prepare_ahead.py), instead of all of them before the first pack.
        The packs are the same: the engine waits for more samples while the next pack could
        still grow. None (the default): on CUDA only (on the CPU there is no device to overlap).
    fuse_qkv: the engine's decoder layers project q, k and v with one GEMM over the three weights
        side by side (sparsevlm/fused_qkv.py; the loaded model is untouched, `model.generate`
        included): at decode batch sizes k and v are too small to stream at the memory's pace alone.
        On an H100, a dense decode step of 64 rows went from 8.29 to 7.90 ms (README, decode graph).
    compile_prefill: the same compiled layers for prefill packs too (the same graphs, the token
        count dynamic). In eager mode a pack's norms, rotary and SwiGLU are ~30% of its device time
        beside the GEMMs; compiled, dense `vqa-1024` runs 1.12x faster on an H100 (README).
    batched_prefill_attention: on CUDA, a prefill pack whose samples are all of one length at a
        layer (a fixed prompt over same-size images, as captioning runs are) runs that layer's
        attention as one batched SDPA call, cuDNN's fused attention (FlashAttention-2 where cuDNN
        declines), instead of the varlen call: on an H100 0.62 ms against 1.60 for 29 x 1121
        tokens (benchmarks/prefill_attention.py); dense `caption-1024` on an H200 21.54 -> 21.93
        img/s (README). Ragged packs, and the CPU, run as before.
    fused_vision: on CUDA, the vision tower's window attention through our Triton kernel
        (kernels/window_attention.py), same-size images' full attention as one batched cuDNN
        call, and a Conv3d patch embedding as the one GEMM it is; False runs transformers'
        modules with FlashAttention varlen (the reference benchmarks compare with).
    vision_fp8: the vision tower's and projector's linear layers multiply in FP8 (e4m3, a scale
        per weight row and per token; sparsevlm/fp8.py) inside the engine's calls; needs FP8
        tensor cores on CUDA (compute capability >= 8.9), runs torch's reference kernels on CPU.
        Off by default: it changes the numbers (README, The vision tower, for its accuracy).
    """

    max_prefill_tokens: int = 32768
    max_num_seqs: int = 128
    max_cache_tokens: int | None = None
    cache_memory_fraction: float = 0.6
    gpu_share: float = 1.0
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    compile_vision: bool = True
    compile_decode: bool = True
    compile_prefill: bool = True
    decode_ahead: bool | None = None
    prepare_ahead: bool | None = None
    fuse_qkv: bool = True
    batched_prefill_attention: bool = True
    fused_vision: bool = True
    vision_fp8: bool = False
    graph_batch_buckets: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128))

    def __post_init__(self) -> None:
        if self.max_prefill_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("EngineConfig.max_prefill_tokens and max_num_seqs must be >= 1")
        if not 0 < self.gpu_share <= 1:
            raise ValueError(f"EngineConfig.gpu_share must be in (0, 1], got {self.gpu_share}")
