"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, Llama decoder, 1-D RoPE.

Every image is resized and centre-cropped to the tower's size (336x336 on the real model: 576
visual tokens, the setting SparseVLM's presets were made for). The host half (`LlavaPreparer`)
needs the config only; positions are 0..L-1. Preprocessing is transformers' own LLaVA processor
on its PIL backend (no torchvision): `LlavaFrameProcessor` only adds what the pipeline needs,
uint8 frames (`return_frames=True`) normalised on the device through a table computed by the
library's own rescale and normalise, so the device gets the processor's pixels bit for bit.
Images only: LLaVA-1.5 has no video input.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..fp8 import NormFeed
from ..preprocess import TokenizerFacade, library_normalization_table, normalize_frames
from .base import (
    ModelAdapter, PreparedSample, RoPE1D, VisualFeatures, checked_input_ids, compiled_blocks, encoder_mlp_norm_feeds)

logger = logging.getLogger(__name__)
IMAGE_PLACEHOLDER = "<image>"


class LlavaFrameProcessor(TokenizerFacade):
    """transformers' `LlavaProcessor` (PIL backend), one sample per call, optionally with uint8 frames.

        processor = LlavaFrameProcessor.from_pretrained(path)
        prompt = processor.apply_chat_template(messages)
        sample = processor(text=[prompt], images=[img], return_frames=True)
    """

    media_kinds = ("image",)

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = processor.image_token_id

    @classmethod
    def from_pretrained(cls, path_or_id, **kwargs) -> "LlavaFrameProcessor":
        from transformers import AutoProcessor

        # PIL on every machine: the torchvision backend resizes with other rounding
        return cls(AutoProcessor.from_pretrained(path_or_id, backend="pil", **kwargs))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, **kwargs)

    def bound_pixels(self, min_pixels: int | None, max_pixels: int | None) -> None:
        logger.warning("LLaVA-1.5 crops every image to its tower's %s; media.min_pixels / max_pixels are ignored",
                       self.image_processor.crop_size)

    def __call__(self, text, images=None, videos=None, return_tensors: str = "pt", return_frames: bool = False,
                 **kwargs) -> dict:
        """`text`: one prompt with one `<image>` per image. `return_frames`: the resized, cropped
        uint8 images (`image_frames`, one (1, H, W, 3) tensor each, and `image_grid_thw` rows
        (1, H / patch, W / patch)) instead of normalised `pixel_values`."""
        if videos:
            raise ValueError("LLaVA-1.5 takes images only; label videos with Qwen2-VL / Qwen2.5-VL")
        if isinstance(text, (list, tuple)):
            if len(text) != 1:
                raise ValueError(f"one sample per call; got {len(text)} prompts")
            text = text[0]
        if return_tensors != "pt":
            raise ValueError("return_tensors='pt' only")
        images = list(images or [])
        pixels = dict(do_rescale=False, do_normalize=False) if return_frames and images else {}
        out = dict(self.processor(text=[text], images=images or None, return_tensors="pt", **pixels, **kwargs))
        if pixels:
            values = out.pop("pixel_values")  # (N, 3, H, W), uint8
            out["image_frames"] = [image.permute(1, 2, 0)[None].contiguous() for image in values]
            patch = self.processor.patch_size
            out["image_grid_thw"] = torch.tensor([[1, values.shape[2] // patch, values.shape[3] // patch]] *
                                                 len(values), dtype=torch.long)
        return out

    def normalization_table(self) -> np.ndarray:
        return library_normalization_table(self.image_processor)


class LlavaPreparer:
    """One sample's host-side work: checks, visual mask, 1-D positions, pinned pixels."""

    def __init__(self, config):
        vision = config.vision_config
        self.image_token_id = config.image_token_id
        self.patch, self.size = vision.patch_size, vision.image_size
        cls_token = 1 if config.vision_feature_select_strategy == "full" else 0
        self.patches_per_image = (self.size // self.patch) ** 2
        self.tokens_per_image = self.patches_per_image + cls_token
        self.vocab_size = config.get_text_config().vocab_size

    def prepare(self, sample: dict, index: int, pin: bool = False) -> PreparedSample:
        input_ids = checked_input_ids(sample, index, self.vocab_size)
        is_visual = input_ids == self.image_token_id
        if "image_frames" in sample:
            key, images = "image_frames", [torch.as_tensor(f) for f in sample["image_frames"]]
            for image in images:
                if image.dtype != torch.uint8 or tuple(image.shape) != (1, self.size, self.size, 3):
                    raise ValueError(f"sample {index}: image frames of {image.dtype} {tuple(image.shape)}; give uint8 "
                                     f"(1, {self.size}, {self.size}, 3) from this model's processor")
            n_images = len(images)
            pixels = [image.contiguous().pin_memory() if pin else image.contiguous() for image in images]
        else:
            key, pixels = "pixel_values", sample.get("pixel_values")
            n_images = 0 if pixels is None else int(pixels.shape[0])
            if pixels is not None:
                pixels = torch.as_tensor(pixels)
                if tuple(pixels.shape[1:]) != (3, self.size, self.size):
                    raise ValueError(f"sample {index}: pixel_values of shape {tuple(pixels.shape)}, but the vision "
                                     f"tower takes (N, 3, {self.size}, {self.size}); the processor does not belong "
                                     "to this model (load both from the same checkpoint)")
                pixels = pixels.pin_memory() if pin else pixels
        n_tokens = int(is_visual.sum())
        if n_tokens != n_images * self.tokens_per_image:
            raise ValueError(f"sample {index}: {n_tokens} <image> tokens in input_ids but {n_images} image(s) need "
                             f"{n_images * self.tokens_per_image} ({self.tokens_per_image} each); build the prompt "
                             "with the processor, one <image> per image")
        visual_inputs = {}
        if n_images:
            side = self.size // self.patch
            visual_inputs = {key: pixels, "image_grid_thw": torch.tensor([[1, side, side]] * n_images)}
        given = sample.get("position_ids")
        positions = (torch.as_tensor(given).long().reshape(1, -1) if given is not None
                     else torch.arange(input_ids.shape[0])[None])
        if positions.shape[1] != input_ids.shape[0]:
            raise ValueError(f"sample {index}: position_ids has {positions.shape[1]} positions for "
                             f"{input_ids.shape[0]} tokens")
        return PreparedSample(index=index, input_ids=input_ids, positions=positions,
                              next_position=int(positions.max()) + 1, visual_inputs=visual_inputs,
                              num_visual_tokens=n_tokens, num_vision_patches=n_images * self.patches_per_image,
                              is_visual=is_visual)


class LlavaAdapter(RoPE1D, ModelAdapter):
    model_types = ("llava",)
    media_kinds = LlavaFrameProcessor.media_kinds

    def __init__(self, model):
        super().__init__(model)
        inner = model.model
        text = inner.language_model
        self.inner = inner
        self._use_decoder(text, model.lm_head)
        self.preparer = LlavaPreparer(model.config)
        self._table: torch.Tensor | None = None

    @classmethod
    def load_processor(cls, path_or_id, config) -> LlavaFrameProcessor:
        return LlavaFrameProcessor.from_pretrained(path_or_id)

    @classmethod
    def load_preparer(cls, config) -> LlavaPreparer:
        return LlavaPreparer(config)

    @classmethod
    def first_token_grid(cls, processor, frame, kind: str) -> tuple:
        image = processor(text=[IMAGE_PLACEHOLDER], images=[frame], return_frames=True)["image_frames"][0][0]
        side = image.shape[0] // processor.processor.patch_size  # a token per patch of the centre crop
        return image.numpy(), side, side

    def check_processor(self, processor) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            return
        self._check_token_ids({IMAGE_PLACEHOLDER: self.model.config.image_token_id},
                              {IMAGE_PLACEHOLDER: getattr(processor, "image_token_id", None)}, tokenizer)

    def use_processor(self, processor) -> None:
        if hasattr(processor, "normalization_table"):
            self._table = torch.from_numpy(processor.normalization_table()).to(self.device)

    def prepare(self, sample: dict, index: int) -> PreparedSample:
        return self.preparer.prepare(sample, index, pin=self.device.type == "cuda")

    def tower_roots(self) -> list[torch.nn.Module]:
        return [self.inner.vision_tower, self.inner.multi_modal_projector]

    def fp8_norm_feeds(self) -> list[NormFeed]:
        return encoder_mlp_norm_feeds(self.inner.vision_tower.encoder.layers)

    def compile_vision(self, backend: str = "inductor") -> None:
        """The CLIP tower's encoder layers compiled (LayerNorm, QuickGELU and residuals fuse)."""
        encoder = self.inner.vision_tower.encoder
        self.use_in_tower(encoder, "layers", compiled_blocks(encoder.layers, backend))

    def encode_visual(self, samples: list[PreparedSample], backend) -> VisualFeatures:
        """One tower call over every image of the pack (all the same size), then the projector."""
        features = VisualFeatures()
        chosen = [s for s in samples if s.visual_inputs]
        if not chosen:
            return features
        self.wait_for_uploads(chosen)
        dtype = self.inner.vision_tower.dtype
        pixels = torch.cat([self.pixels(s).to(dtype) for s in chosen])
        config = self.model.config
        output = self.run_tower(lambda: self.inner.get_image_features(
            pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy))
        per_image = getattr(output, "pooler_output", output)  # a list of (tokens, H) (transformers 5) or a tensor
        features.by_token_id[config.image_token_id] = torch.cat(list(per_image))
        return features

    def pixels(self, sample: PreparedSample) -> torch.Tensor:
        """(N, 3, H, W) float32 on the device: the sample's pixel_values, or its frames normalised here."""
        if "pixel_values" in sample.visual_inputs:
            return self.uploaded(sample, "pixel_values")
        if self._table is None:
            raise ValueError("image frames need the processor's normalisation; build the engine with a "
                             "LlavaFrameProcessor")
        return torch.cat([normalize_frames(frames, self._table) for frames in self.uploaded(sample, "image_frames")])
