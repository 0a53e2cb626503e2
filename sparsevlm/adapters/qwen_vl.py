"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: 3-D M-RoPE positions, image/video pad tokens, packed vision tower.

Qwen3-VL adds three things, all handled here or by transformers' own code: its rotary
interleaves the height and width frequencies among the temporal ones (`rope_tables`), its
videos carry a "<t seconds>" text before each frame group (the processor), and DeepStack:
the vision tower also returns features of some of its early blocks, which the decoder adds
to the visual rows after its first layers (`visual_residuals`, applied by the model runner
before any pruning at that layer, so every visual token gets its own; a token pruned earlier,
under a custom schedule, drops its later ones, and a merged token gets none).

The host half (`QwenVLPreparer`) validates a sample and computes its positions from the
config alone, so the pipeline's CPU stage runs it; the adapter runs the device half.
Pixels arrive either as the processor's float patches or as uint8 frames
(`processor(..., return_frames=True)`), which are normalised and patchified on the device,
bit for bit as the processor does it on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..attention import VISION_ATTENTION_NAME, attention_implementation
from ..fp8 import NormFeed, is_silu_swiglu
from ..preprocess import (
    IMAGE_PAD, TOKEN_TYPE_IMAGE, TOKEN_TYPE_VIDEO, VIDEO_PAD, QwenVLProcessor, normalization_table, normalize_frames,
    patchify, resized_image)
from .base import ModelAdapter, PreparedSample, VisualFeatures, checked_input_ids, compiled_blocks

_VISUAL_KINDS = (  # (token type, pixel key, grid key, kind name)
    (TOKEN_TYPE_IMAGE, "pixel_values", "image_grid_thw", "image"),
    (TOKEN_TYPE_VIDEO, "pixel_values_videos", "video_grid_thw", "video"),
)


class QwenVLPreparer:
    """One sample's host-side work: checks, token types, M-RoPE positions, pinned pixels."""

    def __init__(self, config, get_rope_index=None):
        self.config = config
        self.merge = config.vision_config.spatial_merge_size
        vision = config.vision_config
        self.patch_size, self.temporal_patch = vision.patch_size, vision.temporal_patch_size
        self.patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        self.token_ids = {TOKEN_TYPE_IMAGE: config.image_token_id, TOKEN_TYPE_VIDEO: config.video_token_id}
        self.vocab_size = config.get_text_config().vocab_size
        self._uses_second_per_grid = config.model_type == "qwen2_5_vl"
        if get_rope_index is None:  # transformers' own position code, on a weightless model
            from transformers import AutoModel

            with torch.device("meta"):
                get_rope_index = AutoModel.from_config(config).get_rope_index
        self._get_rope_index = get_rope_index

    @classmethod
    def from_pretrained(cls, path_or_id) -> "QwenVLPreparer":
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(path_or_id))

    def prepare(self, sample: dict, index: int, pin: bool = False) -> PreparedSample:
        input_ids = checked_input_ids(sample, index, self.vocab_size)
        token_types = torch.zeros_like(input_ids, dtype=torch.int32)
        is_visual = torch.zeros_like(input_ids, dtype=torch.bool)
        visual_inputs: dict = {}
        num_visual_tokens = num_patches = 0
        for token_type, pixel_key, grid_key, kind in _VISUAL_KINDS:
            is_kind = input_ids == self.token_ids[token_type]
            token_types[is_kind] = token_type
            is_visual |= is_kind
            n_tokens = int(is_kind.sum())
            grid = sample.get(grid_key)
            expected = int((torch.as_tensor(grid).prod(-1) // self.merge ** 2).sum()) if grid is not None else 0
            if n_tokens != expected:
                raise ValueError(f"sample {index}: {n_tokens} {kind} pad tokens in input_ids but {grid_key} implies "
                                 f"{expected}; build the prompt with the processor so each {kind}'s pad token is "
                                 f"expanded to grid_thw.prod() // {self.merge ** 2} tokens")
            if grid is None:
                continue
            grid = torch.as_tensor(grid).long().cpu().reshape(-1, 3)
            if f"{kind}_frames" in sample:
                visual_inputs[f"{kind}_frames"] = self._check_frames(sample[f"{kind}_frames"], grid, kind, index, pin)
            else:
                visual_inputs[pixel_key] = self._check_patches(sample.get(pixel_key), grid, pixel_key, grid_key,
                                                               index, pin)
            visual_inputs[grid_key] = grid
            num_visual_tokens += n_tokens
            num_patches += int(grid.prod(-1).sum())
        positions = self._positions(sample, input_ids, token_types, visual_inputs, index)
        return PreparedSample(index=index, input_ids=input_ids, positions=positions,
                              next_position=int(positions.max()) + 1, visual_inputs=visual_inputs,
                              num_visual_tokens=num_visual_tokens, num_vision_patches=num_patches,
                              is_visual=is_visual)

    def _positions(self, sample: dict, input_ids, token_types, visual_inputs: dict, index: int) -> torch.Tensor:
        """(3, L) M-RoPE positions: transformers' own `get_rope_index`, unless the sample carries
        them already (`position_ids`, computed by this preparer on a pipeline's CPU stage)."""
        given = sample.get("position_ids")
        if given is not None:
            positions = torch.as_tensor(given).long().reshape(3, -1)
            if positions.shape[1] != input_ids.shape[0]:
                raise ValueError(f"sample {index}: position_ids has {positions.shape[1]} positions for "
                                 f"{input_ids.shape[0]} tokens")
            return positions
        rope_kwargs = {}
        if self._uses_second_per_grid and "video_grid_thw" in visual_inputs:
            seconds = sample.get("second_per_grid_ts")
            if seconds is not None:
                rope_kwargs["second_per_grid_ts"] = torch.as_tensor(seconds).cpu()
        positions, _ = self._get_rope_index(
            input_ids[None], mm_token_type_ids=token_types[None],
            image_grid_thw=visual_inputs.get("image_grid_thw"), video_grid_thw=visual_inputs.get("video_grid_thw"),
            **rope_kwargs)
        return positions[:, 0]

    def _check_patches(self, pixels, grid, pixel_key: str, grid_key: str, index: int, pin: bool) -> torch.Tensor:
        if pixels is None or pixels.shape[0] != int(grid.prod(-1).sum()):
            raise ValueError(f"sample {index}: {pixel_key} has {0 if pixels is None else pixels.shape[0]} "
                             f"patches but {grid_key} implies {int(grid.prod(-1).sum())}")
        if pixels.shape[-1] != self.patch_dim:
            raise ValueError(f"sample {index}: {pixel_key} has {pixels.shape[-1]} values per patch but the model's "
                             f"vision tower expects {self.patch_dim}; the processor does not belong to this "
                             "model (load both from the same checkpoint)")
        pixels = torch.as_tensor(pixels)
        return pixels.pin_memory() if pin else pixels

    def _check_frames(self, frames, grid, kind: str, index: int, pin: bool) -> list[torch.Tensor]:
        """uint8 (T, H, W, 3) per image (T = 1) or video, matching its grid row."""
        frames = [torch.as_tensor(f) for f in frames]
        if len(frames) != grid.shape[0]:
            raise ValueError(f"sample {index}: {len(frames)} {kind} frame stacks but {grid.shape[0]} {kind} grids")
        for item, (t, h, w) in zip(frames, grid.tolist()):
            expected = (-(-item.shape[0] // self.temporal_patch) if item.dim() == 4 else None,
                        h * self.patch_size, w * self.patch_size, 3)
            if item.dtype != torch.uint8 or item.dim() != 4 or tuple(item.shape[1:]) != expected[1:] \
                    or expected[0] != t:
                raise ValueError(f"sample {index}: {kind} frames of {item.dtype} {tuple(item.shape)} do not match "
                                 f"grid ({t}, {h}, {w}); give uint8 (T, {h * self.patch_size}, "
                                 f"{w * self.patch_size}, 3) resized by this model's processor")
        return [f.contiguous().pin_memory() if pin else f.contiguous() for f in frames]


class PatchEmbedAsLinear(torch.nn.Module):
    """Qwen-VL's Conv3d patch embedding, whose kernel equals its stride (one patch), as the one
    GEMM it is: cuDNN runs the Conv3d through a generic implicit-GEMM kernel at a fraction of the
    matrix rate. Shares the conv's weight; patches arrive flattened in the conv's (C, T, P, P) order."""

    def __init__(self, patch_embed):
        super().__init__()
        self.proj = patch_embed.proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # (embed, C * T * P * P)
        patches = hidden_states.reshape(-1, weight.shape[1]).to(weight.dtype)
        return torch.nn.functional.linear(patches, weight, self.proj.bias)


def tower_metadata_on_host(visual, grid: torch.Tensor) -> dict:
    """What transformers' Qwen tower computes from the grid before its blocks (rotary positions,
    attention segments and their longest, Qwen2.5-VL's windows, Qwen3-VL's position-embedding
    interpolation), computed from the host's grid by transformers' own functions. The tower pops
    each from its kwargs when given (transformers.vision_utils): computed from a device grid they
    cost it `.tolist()` / `.item()` syncs, the GPU idling while the host catches up."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    longest = lambda cu: int((cu[1:] - cu[:-1]).max())  # noqa: E731
    cu_seqlens = get_vision_cu_seqlens(grid)
    metadata = {"position_ids": get_vision_position_ids(grid, visual.spatial_merge_size),
                "cu_seqlens": cu_seqlens, "max_seqlen": longest(cu_seqlens)}
    if getattr(visual, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: most blocks attend in windows
        from transformers.vision_utils import get_vision_window_index

        window_index, cu_windows = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                           visual.patch_size)
        metadata.update(window_index=window_index, cu_window_seqlens=cu_windows, max_window_seqlen=longest(cu_windows))
    if hasattr(visual, "num_grid_per_side"):  # Qwen3-VL: learned position embeddings, interpolated per grid
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        metadata["interp_indices"], metadata["interp_weights"] = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
    return metadata


class QwenVLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    media_kinds = QwenVLProcessor.media_kinds

    def __init__(self, model):
        super().__init__(model)
        inner = model.model
        text = inner.language_model
        self.visual = inner.visual
        self._use_decoder(text, model.lm_head)
        self.preparer = QwenVLPreparer(model.config, inner.get_rope_index)
        self.token_ids = self.preparer.token_ids
        self._pixel_configs: dict[str, tuple] = {}  # kind -> (preprocess config, device normalisation table)
        self._tower_metadata: OrderedDict[tuple, dict] = OrderedDict()  # pack shape -> the tower's metadata, uploaded

    @classmethod
    def load_processor(cls, path_or_id, config) -> QwenVLProcessor:
        return QwenVLProcessor.from_pretrained(path_or_id, model_type=config.model_type)

    @classmethod
    def load_preparer(cls, config) -> QwenVLPreparer:
        return QwenVLPreparer(config)

    @classmethod
    def first_token_grid(cls, processor, frame, kind: str) -> tuple:
        cfg = processor.image_cfg if kind == "image" else processor.video_cfg  # a token per merged 28x28 cell
        resized = resized_image(frame, cfg)[0]
        return resized, resized.shape[0] // cfg.factor, resized.shape[1] // cfg.factor

    def check_processor(self, processor) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            return
        config = self.model.config
        expected = {IMAGE_PAD: config.image_token_id, VIDEO_PAD: config.video_token_id}
        self._check_token_ids(expected, {t: tokenizer.convert_tokens_to_ids(t) for t in expected}, tokenizer)

    def use_processor(self, processor) -> None:
        for kind, cfg in (("image", getattr(processor, "image_cfg", None)),
                          ("video", getattr(processor, "video_cfg", None))):
            if cfg is not None:
                table = torch.from_numpy(normalization_table(cfg)).to(self.device)
                self._pixel_configs[kind] = (cfg, table)

    def prepare(self, sample: dict, index: int) -> PreparedSample:
        return self.preparer.prepare(sample, index, pin=self.device.type == "cuda")

    def compile_vision(self, backend: str = "inductor") -> None:
        self.use_in_tower(self.visual, "blocks", compiled_blocks(self.visual.blocks, backend))

    def tower_roots(self) -> list[torch.nn.Module]:
        return [self.visual]  # blocks and merger (Qwen3-VL's DeepStack mergers too)

    def fp8_norm_feeds(self) -> list[NormFeed]:
        """transformers' Qwen vision block is `h + attn(norm1(h))`, `h + mlp(norm2(h))`; its attention
        reads its input only through `qkv`, and an ungated MLP (Qwen2-VL's fc1/fc2, Qwen3-VL's
        linear_fc1/linear_fc2) only through its first linear. Qwen2.5-VL's gated MLP fuses whole."""
        feeds = []
        for block in self.visual.blocks:
            feeds.append(NormFeed(block, "norm1", block.attn, "qkv"))
            first = next((name for name in ("fc1", "linear_fc1") if hasattr(block.mlp, name)), None)
            feeds.append(NormFeed(block, "norm2", block.mlp, first) if first and not is_silu_swiglu(block.mlp)
                         else NormFeed(block, "norm2", block, "mlp"))
        return feeds

    def fuse_vision(self) -> None:
        """The patch embedding as one GEMM inside the engine's tower calls (the model keeps its Conv3d)."""
        self.use_in_tower(self.visual, "patch_embed", PatchEmbedAsLinear(self.visual.patch_embed))

    def encode_visual(self, samples: list[PreparedSample], backend) -> VisualFeatures:
        """One vision-tower call per kind over all images (videos) of the pack, varlen attention."""
        features = VisualFeatures()
        self.wait_for_uploads(samples)
        for token_type, pixel_key, grid_key, kind in _VISUAL_KINDS:
            chosen = [s for s in samples if grid_key in s.visual_inputs]
            if not chosen:
                continue
            pixels = torch.cat([self._patches(s, pixel_key, kind) for s in chosen])
            host_grid = torch.cat([s.visual_inputs[grid_key] for s in chosen])
            metadata, grid = self.tower_metadata(host_grid), self._upload(host_grid)
            with attention_implementation(self.visual.config, VISION_ATTENTION_NAME):
                output = self.run_tower(lambda: self.visual(pixels, grid_thw=grid, sparsevlm_backend=backend,
                                                            **metadata))
            token_id = self.token_ids[token_type]
            features.by_token_id[token_id] = output.pooler_output
            if getattr(output, "deepstack_features", None):
                features.deepstack[token_id] = list(output.deepstack_features)
        return features

    METADATA_SHAPES = 8  # pack shapes whose tower metadata stays on the device (same-size media make few)

    def tower_metadata(self, host_grid: torch.Tensor) -> dict:
        """The tower's metadata for a pack of this grid (`tower_metadata_on_host`), on the device:
        computed and uploaded once per pack shape, no sync."""
        key = tuple(map(tuple, host_grid.tolist()))  # a host tensor: no sync
        if key in self._tower_metadata:
            self._tower_metadata.move_to_end(key)
        else:
            self._tower_metadata[key] = {name: self._upload(value) if isinstance(value, torch.Tensor) else value
                                         for name, value in tower_metadata_on_host(self.visual, host_grid).items()}
            if len(self._tower_metadata) > self.METADATA_SHAPES:
                self._tower_metadata.popitem(last=False)
        return self._tower_metadata[key]

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device, copied from pinned memory (a pageable copy would wait for the GPU)."""
        return (host.pin_memory() if self.device.type == "cuda" else host).to(self.device, non_blocking=True)

    def _patches(self, sample: PreparedSample, pixel_key: str, kind: str) -> torch.Tensor:
        """The sample's patches of one kind on the device, in the tower's dtype: uploaded float
        patches, or uint8 frames normalised and patchified here (equal to the processor's)."""
        dtype = self.visual.dtype
        if pixel_key in sample.visual_inputs:
            return self.uploaded(sample, pixel_key).to(dtype)
        if kind not in self._pixel_configs:
            raise ValueError(f"{kind} frames need the processor's normalisation; build the engine with a processor "
                             "that has image_cfg / video_cfg")
        cfg, table = self._pixel_configs[kind]
        return torch.cat([patchify(normalize_frames(frames, table), cfg)[0].to(dtype)
                          for frames in self.uploaded(sample, f"{kind}_frames")])

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self.rotary_emb(hidden, positions[:, None, :])

    def decode_positions(self, next_positions: torch.Tensor) -> torch.Tensor:
        return next_positions[None, :].expand(3, -1)

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.rotary_emb.inv_freq.float()
        section = self.rotary_emb.mrope_section
        if self.model.config.model_type == "qwen3_vl":  # interleaved: T H W T H W ..., then the rest T
            sections = torch.zeros(inv_freq.shape[0], dtype=torch.long)
            for component in (1, 2):
                sections[component:3 * section[component]:3] = component
        else:  # contiguous: the first section T, then H, then W
            sections = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])
        return inv_freq, sections.to(inv_freq.device)
