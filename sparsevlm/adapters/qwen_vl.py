"""Qwen2-VL and Qwen2.5-VL: 3-D M-RoPE positions, image/video pad tokens, packed vision tower."""

from __future__ import annotations

import contextlib

import torch

from ..attention import VISION_ATTENTION_NAME, attention_implementation
from ..preprocess import TOKEN_TYPE_IMAGE, TOKEN_TYPE_VIDEO
from .base import ModelAdapter, PreparedSample, VisualFeatures

_VISUAL_KINDS = (  # (token type, pixel key, grid key, kind name)
    (TOKEN_TYPE_IMAGE, "pixel_values", "image_grid_thw", "image"),
    (TOKEN_TYPE_VIDEO, "pixel_values_videos", "video_grid_thw", "video"),
)


class QwenVLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def __init__(self, model):
        super().__init__(model)
        inner = model.model
        text = inner.language_model
        self.visual = inner.visual
        self.text_config = text.config
        self.embed_tokens, self.layers, self.norm = text.embed_tokens, text.layers, text.norm
        self.rotary_emb = text.rotary_emb
        self.lm_head = model.lm_head
        config = model.config
        self.merge = config.vision_config.spatial_merge_size
        self.token_ids = {TOKEN_TYPE_IMAGE: config.image_token_id, TOKEN_TYPE_VIDEO: config.video_token_id}
        vision = config.vision_config
        self.patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        self.vocab_size = self.text_config.vocab_size
        self._get_rope_index = inner.get_rope_index
        self._uses_second_per_grid = config.model_type == "qwen2_5_vl"
        self._compiled_blocks: torch.nn.ModuleList | None = None

    def compile_vision(self) -> None:
        """Compile each vision block (dynamic shapes); used only inside `encode_visual`, so the
        model itself, and `model.generate`, stay as loaded."""
        self._compiled_blocks = torch.nn.ModuleList(torch.compile(block, dynamic=True) for block in self.visual.blocks)

    def prepare(self, sample: dict, index: int) -> PreparedSample:
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
        if int(input_ids.max()) >= self.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"sample {index}: token id {int(input_ids.max())} is outside the model's vocabulary "
                             f"({self.vocab_size}); the tokenizer/processor does not belong to this model")
        token_types = torch.zeros_like(input_ids, dtype=torch.int32)
        is_visual = torch.zeros_like(input_ids, dtype=torch.bool)
        visual_inputs: dict[str, torch.Tensor] = {}
        num_visual_tokens = num_patches = 0
        for token_type, pixel_key, grid_key, kind in _VISUAL_KINDS:
            is_kind = input_ids == self.token_ids[token_type]
            token_types[is_kind] = token_type
            is_visual |= is_kind
            n_tokens = int(is_kind.sum())
            grid, pixels = sample.get(grid_key), sample.get(pixel_key)
            expected = int((torch.as_tensor(grid).prod(-1) // self.merge ** 2).sum()) if grid is not None else 0
            if n_tokens != expected:
                raise ValueError(f"sample {index}: {n_tokens} {kind} pad tokens in input_ids but {grid_key} implies "
                                 f"{expected}; build the prompt with the processor so each {kind}'s pad token is "
                                 f"expanded to grid_thw.prod() // {self.merge ** 2} tokens")
            if grid is None:
                continue
            grid = torch.as_tensor(grid).long().cpu()
            if pixels is None or pixels.shape[0] != int(grid.prod(-1).sum()):
                raise ValueError(f"sample {index}: {pixel_key} has {0 if pixels is None else pixels.shape[0]} "
                                 f"patches but {grid_key} implies {int(grid.prod(-1).sum())}")
            if pixels.shape[-1] != self.patch_dim:
                raise ValueError(f"sample {index}: {pixel_key} has {pixels.shape[-1]} values per patch but the model's "
                                 f"vision tower expects {self.patch_dim}; the processor does not belong to this "
                                 "model (load both from the same checkpoint)")
            visual_inputs[pixel_key], visual_inputs[grid_key] = pixels, grid
            num_visual_tokens += n_tokens
            num_patches += int(pixels.shape[0])
        rope_kwargs = {}
        if self._uses_second_per_grid and "video_grid_thw" in visual_inputs:
            seconds = sample.get("second_per_grid_ts")
            if seconds is not None:
                rope_kwargs["second_per_grid_ts"] = torch.as_tensor(seconds).cpu()
        positions, _ = self._get_rope_index(
            input_ids[None], mm_token_type_ids=token_types[None],
            image_grid_thw=visual_inputs.get("image_grid_thw"), video_grid_thw=visual_inputs.get("video_grid_thw"),
            **rope_kwargs)
        positions = positions[:, 0]
        return PreparedSample(index=index, input_ids=input_ids, positions=positions,
                              next_position=int(positions.max()) + 1, visual_inputs=visual_inputs,
                              num_visual_tokens=num_visual_tokens, num_vision_patches=num_patches,
                              is_visual=is_visual)

    def encode_visual(self, samples: list[PreparedSample], backend) -> VisualFeatures:
        """One vision-tower call per kind over all images (videos) of the pack, varlen attention."""
        features = VisualFeatures()
        device, dtype = self.lm_head.weight.device, self.visual.dtype
        for token_type, pixel_key, grid_key, _ in _VISUAL_KINDS:
            chosen = [s.visual_inputs for s in samples if pixel_key in s.visual_inputs]
            if not chosen:
                continue
            pixels = torch.cat([v[pixel_key] for v in chosen]).to(device=device, dtype=dtype, non_blocking=True)
            grid = torch.cat([v[grid_key] for v in chosen])
            grid = (grid.pin_memory() if device.type == "cuda" else grid).to(device, non_blocking=True)
            with attention_implementation(self.visual.config, VISION_ATTENTION_NAME), self._vision_blocks():
                output = self.visual(pixels, grid_thw=grid, sparsevlm_backend=backend)
            features.by_token_id[self.token_ids[token_type]] = output.pooler_output
        return features

    @contextlib.contextmanager
    def _vision_blocks(self):
        if self._compiled_blocks is None:
            yield
            return
        original = self.visual.blocks
        self.visual.blocks = self._compiled_blocks
        try:
            yield
        finally:
            self.visual.blocks = original

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self.rotary_emb(hidden, positions[:, None, :])

    def decode_positions(self, next_positions: torch.Tensor) -> torch.Tensor:
        return next_positions[None, :].expand(3, -1)

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.rotary_emb.inv_freq.float()
        sections = torch.cat([torch.full((n,), i % 3, dtype=torch.long)
                              for i, n in enumerate(self.rotary_emb.mrope_section)]).to(inv_freq.device)
        return inv_freq, sections
