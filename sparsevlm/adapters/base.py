"""What the engine needs to know about a model family, and nothing more.

An adapter loads the family's processor, turns one processor output into a `PreparedSample`
(validated, positions computed on the host: a CPU stage can do this with the config alone),
starts its pixels' upload, runs the vision tower over the visual inputs of a whole pack
(uint8 frames are normalised and patchified on the device), builds the packed input
embeddings, and exposes the decoder pieces (layers, final norm, lm_head, rotary).
Everything else in the engine is family-agnostic.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from ..fp8 import NormFeed, fp8_replacements, replaced_linears

logger = logging.getLogger(__name__)


@dataclass
class PreparedSample:
    index: int  # position in the caller's list
    input_ids: torch.Tensor  # (L,) long, host
    positions: torch.Tensor  # (P, L) long, host: the family's position ids (P = 3 for M-RoPE)
    next_position: int  # position of the first generated token
    # pixel tensors (float patches, or lists of uint8 frames) and grids, on the host; pinned on CUDA
    visual_inputs: dict[str, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict)
    num_visual_tokens: int = 0
    num_vision_patches: int = 0
    is_visual: torch.Tensor | None = None  # (L,) bool, host: which tokens are visual placeholders
    on_device: dict[str, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict)  # uploads in flight
    upload_done: object = None  # CUDA event the uploads finish with (None on CPU)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def head_length(self) -> int:
        """Tokens up to and including the last visual one (0 without visual tokens); the rest
        is the text region whose tokens rate the visual ones and are never pruned."""
        if not self.num_visual_tokens:
            return 0
        return int(torch.nonzero(self.is_visual)[-1]) + 1


@dataclass
class VisualFeatures:
    """Vision-tower output for one pack, per placeholder token id, in pack order."""

    by_token_id: dict[int, torch.Tensor] = field(default_factory=dict)  # token id -> (n_tokens, H)
    # Qwen3-VL's DeepStack: token id -> per early decoder layer, (n_tokens, H) added after that layer
    deepstack: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def checked_input_ids(sample, index: int, vocab_size: int) -> torch.Tensor:
    """One processor output's token ids as (L,) long on the host, padding dropped, or a clear error."""
    if not isinstance(sample, dict) and not hasattr(sample, "keys"):
        raise TypeError(f"sample {index}: expected the processor's output dict, got {type(sample).__name__}")
    if sample.get("input_ids") is None:
        raise ValueError(f"sample {index} has no input_ids; pass what processor(text=[prompt], images=...) "
                         "returns for that one sample")
    input_ids = torch.as_tensor(sample["input_ids"]).long().cpu()
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(f"sample {index}: input_ids has batch size {input_ids.shape[0]}; "
                             "give one dict per sample (processor called on one prompt)")
        mask = sample.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"sample {index}: attention_mask shape {tuple(mask.shape)} differs from input_ids "
                             f"shape {tuple(input_ids.shape)}")
        input_ids = input_ids[0]
        if mask is not None:  # drop padding a batched processor call may have added
            input_ids = input_ids[torch.as_tensor(mask)[0].bool().cpu()]
    if input_ids.numel() == 0:
        raise ValueError(f"sample {index}: input_ids is empty")
    if int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0:
        raise ValueError(f"sample {index}: token id {int(input_ids.max())} is outside the model's vocabulary "
                         f"({vocab_size}); the tokenizer/processor does not belong to this model")
    return input_ids


class ModelAdapter:
    """Interface; see adapters/qwen_vl.py for the reference implementation."""

    model_types: tuple[str, ...] = ()
    media_kinds: tuple[str, ...] = ()  # what its processor takes: "image", "video"

    def __init__(self, model):
        self.model = model
        self.device = model.lm_head.weight.device
        self._upload_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._tower_swaps: dict[tuple[int, str], tuple[torch.nn.Module, str, torch.nn.Module]] = {}

    @classmethod
    def load_processor(cls, path_or_id, config):
        """The family's processor, from the checkpoint's files."""
        raise NotImplementedError

    @classmethod
    def load_preparer(cls, config):
        """The host half alone (an object with `prepare(sample, index) -> PreparedSample`), from the
        config only: what a CPU stage runs so the engine's actor redoes no per-sample work."""
        raise NotImplementedError

    @classmethod
    def first_token_grid(cls, processor, frame, kind: str) -> tuple:
        """Where the first visual tokens of an image (a video's first frame group) sit:
        (the frame as the tower sees it, uint8 (H, W, 3); rows; columns); token k covers cell
        (k // columns, k % columns). The cost report's gallery draws kept tokens with it."""
        raise NotImplementedError

    def check_processor(self, processor) -> None:
        """Raise if `processor` belongs to another checkpoint (token ids, vocabulary, patch size)."""

    def _use_decoder(self, text_model, lm_head) -> None:
        """The decoder pieces the engine drives, from the family's text model."""
        self.text_config = text_model.config
        self.embed_tokens, self.layers, self.norm = text_model.embed_tokens, text_model.layers, text_model.norm
        self.rotary_emb = text_model.rotary_emb
        self.lm_head = lm_head
        self.vocab_size = self.text_config.vocab_size

    def _check_token_ids(self, expected: dict[str, int], found: dict[str, int | None], tokenizer) -> None:
        """Placeholder ids and vocabulary size agree with the model, or a one-line error."""
        for name, model_id in expected.items():
            if found[name] != model_id:
                raise ValueError(f"processor maps {name} to id {found[name]} but the model expects {model_id}: model "
                                 "and processor come from different checkpoints (load both from the same path)")
        if len(tokenizer) > self.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {self.vocab_size}: "
                             "model and processor come from different checkpoints")

    def use_processor(self, processor) -> None:
        """Learn what the device-side pixel path needs from the processor (normalisation)."""

    # -- host side ---------------------------------------------------------------------------------
    def prepare(self, sample: dict, index: int) -> PreparedSample:
        raise NotImplementedError

    def start_upload(self, sample: PreparedSample) -> None:
        """Copy the sample's pixels on a side stream now, so the copy overlaps whatever the GPU is running."""
        if self._upload_stream is None or sample.upload_done is not None:
            return
        with torch.cuda.stream(self._upload_stream):
            for key, value in sample.visual_inputs.items():
                if not (key.startswith("pixel_values") or key.endswith(("_frames", "_tiles"))):
                    continue  # grids, sizes: host-side metadata
                items = value if isinstance(value, list) else [value]
                uploaded = [item.to(self.device, non_blocking=True) for item in items]
                sample.on_device[key] = uploaded if isinstance(value, list) else uploaded[0]
            sample.upload_done = torch.cuda.Event()
            sample.upload_done.record(self._upload_stream)

    def wait_for_uploads(self, samples: list[PreparedSample]) -> None:
        """The current stream waits for the samples' side-stream copies (encode_visual calls this first)."""
        if self._upload_stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        for sample in samples:
            if sample.upload_done is not None:
                current.wait_event(sample.upload_done)

    def uploaded(self, sample: PreparedSample, key: str):
        """The sample's `key` pixels on the device (its upload, or a copy now), each tensor's memory
        kept until the current stream has read it."""
        value = (sample.on_device or sample.visual_inputs)[key]
        items = [self._mark_used(item).to(self.device, non_blocking=True)
                 for item in (value if isinstance(value, list) else [value])]
        return items if isinstance(value, list) else items[0]

    def _mark_used(self, tensor: torch.Tensor) -> torch.Tensor:
        """An upload made on the side stream is read on the current one: keep its memory until then."""
        if self._upload_stream is not None and tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(self.device))
        return tensor

    # -- device side -------------------------------------------------------------------------------
    def encode_visual(self, samples: list[PreparedSample], backend) -> VisualFeatures:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, features: VisualFeatures) -> torch.Tensor:
        """(T,) ids -> (T, H) embeddings with visual placeholders replaced by features."""
        hidden = self.embed_tokens(input_ids)
        for token_id, embeds in features.by_token_id.items():
            mask = (input_ids == token_id)[:, None]
            hidden = hidden.masked_scatter(mask, embeds.to(hidden.dtype))
        return hidden

    def visual_residuals(self, input_ids: torch.Tensor, features: VisualFeatures) -> list[torch.Tensor]:
        """What decoder layer i (i < len) adds to the visual rows after it runs (DeepStack), as
        (n_visual, H) in the pack's visual-row order; [] for families without it."""
        if not features.deepstack:
            return []
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in features.deepstack:
            visual |= input_ids == token_id
        residuals = []
        for layer in range(len(next(iter(features.deepstack.values())))):
            full = None
            for token_id, per_layer in features.deepstack.items():
                values = per_layer[layer]
                full = values.new_zeros(input_ids.shape[0], values.shape[1]) if full is None else full
                full = full.masked_scatter((input_ids == token_id)[:, None], values)
            residuals.append(full[visual])
        return residuals

    def compile_vision(self, backend: str = "inductor") -> None:
        """Optionally torch.compile the vision tower's blocks for the engine's own calls."""

    def fuse_vision(self) -> None:
        """Optionally swap in the engine's fused vision modules for its own calls (CUDA)."""

    def tower_roots(self) -> list[torch.nn.Module]:
        """The modules that turn pixels into the decoder's visual rows (tower and projector)."""
        raise NotImplementedError

    def fp8_norm_feeds(self) -> list[NormFeed]:
        """The tower's norms whose output only one linear (or MLP) reads: their FP8 copies compute
        the norm inside their quantisation. Knowledge of the family's block code; none by default."""
        return []

    def quantize_vision(self) -> int:
        """Every linear layer of the tower and projector as an FP8 copy inside the engine's tower
        calls (sparsevlm/fp8.py); returns how many."""
        replacements = fp8_replacements(self.tower_roots(), self.fp8_norm_feeds())
        for parent, name, module in replacements:
            self.use_in_tower(parent, name, module)
        return replaced_linears(replacements)

    # -- the engine's own modules in the vision tower ------------------------------------------------
    def use_in_tower(self, parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
        """Run `module` as `parent.<name>` inside the engine's tower calls (`run_tower`); the model
        itself, and `model.generate`, keep their own."""
        self._tower_swaps[(id(parent), name)] = (parent, name, module)

    def run_tower(self, call):
        """`call()` with the engine's tower modules in place. A compiler failure (tracing or backend:
        never a device fault) gives them up for good, logged, and the call runs on the model's own."""
        swaps = list(self._tower_swaps.values())
        if not swaps:
            return call()
        try:
            with _swapped(swaps):
                return call()
        except torch._dynamo.exc.TorchDynamoException as error:
            logger.warning("the engine's vision-tower modules failed to compile (%s); running the model's own",
                           compiler_failure(error))
            self._tower_swaps = {}
            return call()

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """hidden (1, T, H), positions (P, T) -> what decoder layers take as `position_embeddings`."""
        raise NotImplementedError

    def decode_positions(self, next_positions: torch.Tensor) -> torch.Tensor:
        """(B,) next positions -> (P, B) position ids of one decode step."""
        raise NotImplementedError

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inv_freq (D/2,), sections (D/2,)): the rotary frequencies and which position
        component each rotates with (all 0 for 1-D RoPE). SparseVLM+ builds its prior from them."""
        raise NotImplementedError

    # -- decoder pieces, set by subclasses ------------------------------------------------------------
    text_config = None
    embed_tokens = None
    layers = None
    norm = None
    lm_head = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attention_scale(self) -> float:
        return getattr(self.layers[0].self_attn, "scaling", self.head_dim ** -0.5)

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or (
            self.text_config.hidden_size // self.text_config.num_attention_heads)


class RoPE1D:
    """Position ids 0..L-1 and the model's own rotary: LLaVA-1.5, LLaVA-OneVision (mixed into their adapters)."""

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self.rotary_emb(hidden, positions)

    def decode_positions(self, next_positions: torch.Tensor) -> torch.Tensor:
        return next_positions[None, :]

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.rotary_emb.inv_freq.float()
        return inv_freq, torch.zeros_like(inv_freq, dtype=torch.long)  # one position component


def encoder_mlp_norm_feeds(layers: torch.nn.ModuleList) -> list[NormFeed]:
    """CLIP's and SigLIP's encoder layers: `h + mlp(layer_norm2(h))`, the MLP reading its input only
    through fc1. (`layer_norm1` feeds three projections, q, k and v: not one reader, not fused.)"""
    return [NormFeed(layer, "layer_norm2", layer.mlp, "fc1") for layer in layers]


def compiler_failure(error: Exception) -> str:
    """A torch.compile failure in one line, for the log line that says what the engine gave up."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def compiled_blocks(blocks: torch.nn.ModuleList, backend: str = "inductor") -> torch.nn.ModuleList:
    """A tower's repeated blocks, each torch.compile'd (dynamic shapes: packs differ in size)."""
    return torch.nn.ModuleList(torch.compile(block, dynamic=True, backend=backend) for block in blocks)


@contextlib.contextmanager
def _swapped(swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]]):
    originals = [(parent, name, getattr(parent, name)) for parent, name, _ in swaps]
    for parent, name, module in swaps:
        setattr(parent, name, module)
    try:
        yield
    finally:
        for parent, name, module in originals:
            setattr(parent, name, module)
