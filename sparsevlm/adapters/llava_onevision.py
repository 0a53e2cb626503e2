"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, any-resolution tiles
with image-newline tokens, 2x2-pooled video frames, a Qwen2 decoder with 1-D RoPE.

transformers' `LlavaOnevisionProcessor` cannot be built without torchvision (its video
processor), so `OnevisionProcessor` assembles the same output from the parts that can: the
library's PIL image processor (tiles, padding, `image_sizes`) and the library's own token
arithmetic (`_get_number_of_features`, called on a processor object that skips the
torchvision-bound constructor). Video frames are resized with PIL bicubic (the
torchvision processor rounds differently, as for Qwen-VL). The vision features are the
model's own `get_image_features` / `get_video_features` (tiles, unpadding, newlines, pooling),
over all of a pack's images in one tower call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..fp8 import NormFeed
from ..preprocess import (
    TokenizerFacade, VisionPreprocessConfig, _to_rgb_uint8, expand_placeholders, library_normalization_table,
    normalization_table, normalize_frames, resize_frame)
from .base import (
    ModelAdapter, PreparedSample, RoPE1D, VisualFeatures, checked_input_ids, compiled_blocks, encoder_mlp_norm_feeds)

IMAGE, VIDEO = "<image>", "<video>"


def _token_arithmetic(num_image_tokens: int, strategy: str, aspect_ratio: str, grid_pinpoints):
    """transformers' LlavaOnevisionProcessor holding only what its token arithmetic reads."""
    from transformers import LlavaOnevisionProcessor

    counter = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    counter.__dict__.update(num_image_tokens=num_image_tokens, vision_feature_select_strategy=strategy,
                            vision_aspect_ratio=aspect_ratio, image_token=IMAGE, video_token=VIDEO,
                            image_processor=SimpleNamespace(image_grid_pinpoints=grid_pinpoints))
    return counter


def image_token_counts(counter, image_sizes, batch_num_images, tile_side: int) -> list[int]:
    """Placeholders per image, as transformers' processor counts them: its own any-resolution
    arithmetic (`_get_number_of_features`, stable across transformers 4.4x-5.x) for a lone image,
    the base tile and a newline for each image of a multi-image input, less the CLS token under
    the "default" strategy."""
    multi = [int(n) != 1 for n in batch_num_images for _ in range(int(n))]
    drop_cls = int(counter.vision_feature_select_strategy == "default")
    return [(counter.num_image_tokens + 1 if is_multi else
             counter._get_number_of_features(int(h), int(w), tile_side, tile_side)) - drop_cls
            for (h, w), is_multi in zip(image_sizes.tolist() if hasattr(image_sizes, "tolist") else image_sizes, multi)]


def video_token_count(patches_per_side: int, num_frames: int) -> int:
    """Frames are 2x2-pooled (rounding up) and one newline closes the video."""
    pooled = math.ceil(patches_per_side / 2)
    return num_frames * pooled * pooled + 1


def tiles_per_image(grid_pinpoints, tile_side: int, image_sizes, batch_num_images) -> list[int]:
    """How many tiles of each image the model reads (the base tile alone for multi-image inputs),
    by the library's own count."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    return [image_size_to_num_patches([int(v) for v in size], grid_pinpoints, tile_side) if patch else 1
            for size, patch in zip(image_sizes, patching)]


class OnevisionProcessor(TokenizerFacade):
    """One sample per call, like transformers' processor; `return_frames=True` gives uint8 tiles
    (`image_frames`: (tiles, S, S, 3) per image) and frames (`video_frames`: (F, S, S, 3)), with
    `*_grid_thw` rows (1, original height, original width) per image and (F, S, S) per video:
    what the pipeline's columns carry for every family."""

    media_kinds = ("image", "video")

    def __init__(self, tokenizer, image_processor, counter, video_cfg: VisionPreprocessConfig, video_side: int):
        self.tokenizer, self.image_processor, self.counter = tokenizer, image_processor, counter
        self.video_cfg, self.video_side = video_cfg, video_side
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO)
        ip = image_processor
        self.image_cfg = VisionPreprocessConfig(min_pixels=0, max_pixels=0, image_mean=tuple(ip.image_mean),
                                                image_std=tuple(ip.image_std), rescale_factor=ip.rescale_factor)

    @classmethod
    def from_pretrained(cls, path_or_id, **kwargs) -> "OnevisionProcessor":
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil
        from transformers.utils import cached_file

        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path_or_id)
        config = AutoConfig.from_pretrained(path_or_id)
        found = cached_file(path_or_id, "processor_config.json", _raise_exceptions_for_missing_entries=False)
        settings = json.loads(Path(found).read_text()) if found else {}
        side = config.vision_config.image_size
        counter = _token_arithmetic(settings.get("num_image_tokens", (side // config.vision_config.patch_size) ** 2),
                                    settings.get("vision_feature_select_strategy",
                                                 config.vision_feature_select_strategy),
                                    settings.get("vision_aspect_ratio", config.vision_aspect_ratio),
                                    image_processor.image_grid_pinpoints)
        video = cached_file(path_or_id, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        raw = json.loads(Path(video).read_text()) if video else {}
        video_cfg = VisionPreprocessConfig(min_pixels=0, max_pixels=0,
                                           image_mean=tuple(raw.get("image_mean", image_processor.image_mean)),
                                           image_std=tuple(raw.get("image_std", image_processor.image_std)),
                                           rescale_factor=float(raw.get("rescale_factor", 1 / 255)))
        return cls(tokenizer, image_processor, counter, video_cfg, int(raw.get("size", {}).get("height", side)))

    def bound_pixels(self, min_pixels: int | None, max_pixels: int | None) -> None:
        import logging

        logging.getLogger(__name__).warning("LLaVA-OneVision tiles images by its grid pinpoints; media.min_pixels / "
                                            "max_pixels are ignored")

    def __call__(self, text, images=None, videos=None, return_tensors: str = "pt", return_frames: bool = False,
                 video_fps: float | None = None) -> dict:
        if isinstance(text, (list, tuple)):
            if len(text) != 1:
                raise ValueError(f"one sample per call; got {len(text)} prompts")
            text = text[0]
        if return_tensors != "pt":
            raise ValueError("return_tensors='pt' only")
        images, videos = list(images or []), list(videos or [])
        out: dict = {}
        image_counts: list[int] = []
        if images:
            raw = {"do_rescale": False, "do_normalize": False} if return_frames else {}
            processed = self.image_processor(images, return_tensors="pt", **raw)
            sizes, per_sample = processed["image_sizes"], processed["batch_num_images"]
            image_counts = image_token_counts(self.counter, sizes, per_sample, processed["pixel_values"].shape[-1])
            out.update(image_sizes=sizes, batch_num_images=torch.as_tensor(per_sample))
            if return_frames:
                tiles = tiles_per_image(self.image_processor.image_grid_pinpoints, processed["pixel_values"].shape[-1],
                                        sizes, per_sample)
                out["image_frames"] = [image[:n].to(torch.uint8).permute(0, 2, 3, 1).contiguous()
                                       for image, n in zip(processed["pixel_values"], tiles)]
                out["image_grid_thw"] = torch.cat([torch.ones(len(sizes), 1, dtype=torch.long), sizes.long()], dim=1)
                out.pop("image_sizes")  # the grid rows say it (the pipeline's columns)
            else:
                out["pixel_values"] = processed["pixel_values"]
        video_counts: list[int] = []
        if videos:
            resized = [self._resized_video(v) for v in videos]
            side = math.isqrt(self.counter.num_image_tokens)
            video_counts = [video_token_count(side, len(frames)) for frames in resized]
            if return_frames:
                out["video_frames"] = [torch.from_numpy(frames) for frames in resized]
                out["video_grid_thw"] = torch.tensor([list(frames.shape[:3]) for frames in resized])
            else:
                table = normalization_table(self.video_cfg)
                out["pixel_values_videos"] = torch.from_numpy(np.stack([normalize_frames(f, table) for f in resized]))
        text = expand_placeholders(text, IMAGE, image_counts, "image")
        text = expand_placeholders(text, VIDEO, video_counts, "video")
        input_ids = torch.tensor([self.tokenizer(text)["input_ids"]], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **out}

    def _resized_video(self, frames) -> np.ndarray:
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if not frames:
            raise ValueError("a video needs at least one frame")
        return np.stack([resize_frame(_to_rgb_uint8(f), (self.video_side, self.video_side)) for f in frames])

    def normalization_table(self, kind: str) -> np.ndarray:
        if kind == "video":
            return normalization_table(self.video_cfg)
        return library_normalization_table(self.image_processor)  # as on a tile


class OnevisionPreparer:
    """One sample's host-side work: checks (token counts by the library's arithmetic), 1-D
    positions, pinned pixels."""

    def __init__(self, config):
        vision = config.vision_config
        self.config = config
        self.side = vision.image_size
        self.patches_per_tile = (vision.image_size // vision.patch_size) ** 2
        self.counter = _token_arithmetic(self.patches_per_tile, config.vision_feature_select_strategy,
                                         config.vision_aspect_ratio, config.image_grid_pinpoints)
        self.token_ids = {"image": config.image_token_id, "video": config.video_token_id}
        self.vocab_size = config.get_text_config().vocab_size

    def prepare(self, sample: dict, index: int, pin: bool = False) -> PreparedSample:
        input_ids = checked_input_ids(sample, index, self.vocab_size)
        is_visual = (input_ids == self.token_ids["image"]) | (input_ids == self.token_ids["video"])
        visual: dict = {}
        patches = 0
        expected = {"image": 0, "video": 0}
        if sample.get("image_sizes") is not None or sample.get("image_grid_thw") is not None:
            sizes = (torch.as_tensor(sample["image_sizes"]).long().reshape(-1, 2) if sample.get("image_sizes")
                     is not None else torch.as_tensor(sample["image_grid_thw"]).long().reshape(-1, 3)[:, 1:])
            per_sample = [int(n) for n in torch.as_tensor(sample.get("batch_num_images", [1] * len(sizes))).flatten()]
            if sum(per_sample) != len(sizes):
                raise ValueError(f"sample {index}: batch_num_images {per_sample} does not add up to {len(sizes)} images")
            tiles = tiles_per_image(self.config.image_grid_pinpoints, self.side, sizes.tolist(), per_sample)
            visual["image_tiles"] = self._pixels(sample, "image", tiles, index, pin)
            visual.update(image_sizes=sizes, batch_num_images=per_sample)
            expected["image"] = sum(image_token_counts(self.counter, sizes, per_sample, self.side))
            patches += sum(tiles) * self.patches_per_tile
        videos = sample.get("video_frames", sample.get("pixel_values_videos"))
        if videos is not None:
            frames = [len(v) for v in videos]
            visual["video_frames"] = self._pixels(sample, "video", frames, index, pin)
            expected["video"] = sum(video_token_count(math.isqrt(self.counter.num_image_tokens), n) for n in frames)
            patches += sum(frames) * self.patches_per_tile
        for kind, count in expected.items():
            found = int((input_ids == self.token_ids[kind]).sum())
            if found != count:
                raise ValueError(f"sample {index}: {found} {kind} tokens in input_ids but its {kind}s need {count}; "
                                 "build the prompt with this model's processor")
        given = sample.get("position_ids")
        positions = (torch.as_tensor(given).long().reshape(1, -1) if given is not None
                     else torch.arange(input_ids.shape[0])[None])
        return PreparedSample(index=index, input_ids=input_ids, positions=positions,
                              next_position=int(positions.max()) + 1, visual_inputs=visual,
                              num_visual_tokens=int(is_visual.sum()), num_vision_patches=patches, is_visual=is_visual)

    def _pixels(self, sample: dict, kind: str, counts: list[int], index: int, pin: bool) -> list[torch.Tensor]:
        """Per image its tiles, per video its frames: uint8 (n, S, S, 3) or float (n, 3, S, S)."""
        if f"{kind}_frames" in sample:
            items = [torch.as_tensor(f) for f in sample[f"{kind}_frames"]]
            shape = lambda n: (n, self.side, self.side, 3)  # noqa: E731
        else:
            values = sample.get("pixel_values" if kind == "image" else "pixel_values_videos")
            if values is None:
                raise ValueError(f"sample {index}: {kind} sizes given but no {kind} pixels")
            items = [torch.as_tensor(v)[:n] for v, n in zip(values, counts)]
            shape = lambda n: (n, 3, self.side, self.side)  # noqa: E731
        if len(items) != len(counts):
            raise ValueError(f"sample {index}: {len(items)} {kind} pixel stacks for {len(counts)} {kind}s")
        for item, n in zip(items, counts):
            if tuple(item.shape) != shape(n):
                raise ValueError(f"sample {index}: {kind} pixels of shape {tuple(item.shape)}, expected {shape(n)}; "
                                 "the processor does not belong to this model (load both from the same checkpoint)")
        return [item.contiguous().pin_memory() if pin else item.contiguous() for item in items]


class LlavaOnevisionAdapter(RoPE1D, ModelAdapter):
    model_types = ("llava_onevision",)
    media_kinds = OnevisionProcessor.media_kinds

    def __init__(self, model):
        super().__init__(model)
        self.inner = model.model
        text = self.inner.language_model
        self._use_decoder(text, model.lm_head)
        self.preparer = OnevisionPreparer(model.config)
        self._tables: dict[str, torch.Tensor] = {}

    @classmethod
    def load_processor(cls, path_or_id, config) -> OnevisionProcessor:
        return OnevisionProcessor.from_pretrained(path_or_id)

    @classmethod
    def load_preparer(cls, config) -> OnevisionPreparer:
        return OnevisionPreparer(config)

    @classmethod
    def first_token_grid(cls, processor, frame, kind: str) -> tuple:
        """The base tile (the whole image squeezed to the tower's square) comes first, a token per patch."""
        if kind == "video":
            frames = processor(text=[VIDEO], videos=[[frame]], return_frames=True)["video_frames"][0]
        else:
            frames = processor(text=[IMAGE], images=[frame], return_frames=True)["image_frames"][0]
        side = int(round(processor.counter.num_image_tokens ** 0.5))
        if kind == "video":
            side = -(-side // 2)  # frames are 2x2-pooled
        return frames[0].numpy(), side, side

    def check_processor(self, processor) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            return
        config = self.model.config
        self._check_token_ids({IMAGE: config.image_token_id, VIDEO: config.video_token_id},
                              {IMAGE: getattr(processor, "image_token_id", None),
                               VIDEO: getattr(processor, "video_token_id", None)}, tokenizer)

    def use_processor(self, processor) -> None:
        if hasattr(processor, "normalization_table"):
            self._tables = {kind: torch.from_numpy(processor.normalization_table(kind)).to(self.device)
                            for kind in ("image", "video")}

    def prepare(self, sample: dict, index: int) -> PreparedSample:
        return self.preparer.prepare(sample, index, pin=self.device.type == "cuda")

    def pixels(self, sample: PreparedSample, key: str) -> list[torch.Tensor]:
        """The sample's tiles (key image_tiles) or frames (video_frames) as float (n, 3, S, S) on the device."""
        kind = "image" if key == "image_tiles" else "video"
        items = self.uploaded(sample, key)
        if items and items[0].dtype != torch.uint8:
            return items
        if kind not in self._tables:
            raise ValueError("uint8 pixels need the processor's normalisation; build the engine with an "
                             "OnevisionProcessor")
        return [normalize_frames(item, self._tables[kind]) for item in items]

    def tower_roots(self) -> list[torch.nn.Module]:
        return [self.inner.vision_tower, self.inner.multi_modal_projector]

    def fp8_norm_feeds(self) -> list[NormFeed]:
        return encoder_mlp_norm_feeds(self.inner.vision_tower.encoder.layers)

    def compile_vision(self, backend: str = "inductor") -> None:
        """The SigLIP tower's encoder layers compiled (LayerNorm, GELU and residuals fuse)."""
        encoder = self.inner.vision_tower.encoder
        self.use_in_tower(encoder, "layers", compiled_blocks(encoder.layers, backend))

    def encode_visual(self, samples: list[PreparedSample], backend) -> VisualFeatures:
        """Every image tile of the pack in one tower call (the model's own packing, newlines and
        unpadding), each video through the model's own pooled path."""
        features = VisualFeatures()
        config = self.model.config
        dtype = self.inner.vision_tower.dtype
        self.wait_for_uploads(samples)
        with_images = [s for s in samples if "image_tiles" in s.visual_inputs]
        if with_images:
            tiles = torch.cat([t for s in with_images for t in self.pixels(s, "image_tiles")]).to(dtype)
            sizes = torch.cat([s.visual_inputs["image_sizes"] for s in with_images]).to(self.device)
            output = self.run_tower(lambda: self.inner.get_image_features(
                pixel_values=tiles, image_sizes=sizes, vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                vision_aspect_ratio=config.vision_aspect_ratio,
                batch_num_images=[n for s in with_images for n in s.visual_inputs["batch_num_images"]]))
            features.by_token_id[config.image_token_id] = torch.cat(list(getattr(output, "pooler_output", output)))
        videos = [v for s in samples if "video_frames" in s.visual_inputs for v in self.pixels(s, "video_frames")]
        if videos:
            rows = [self._video_rows(video, dtype) for video in videos]
            features.by_token_id[config.video_token_id] = torch.cat(rows)
        return features

    def _video_rows(self, video: torch.Tensor, dtype) -> torch.Tensor:
        """One video's rows: its frames' 2x2-pooled features and the image-newline token after them.
        transformers 5.24's `get_video_features` appends the newline, 5.17's leaves it to the model's
        forward: add it where the library did not."""
        config = self.model.config
        out = self.run_tower(lambda: self.inner.get_video_features(  # positional: 5.17 names it pixel_values
            video[None].to(dtype), vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy))
        rows = getattr(out, "pooler_output", out).flatten(0, 1)
        side = config.vision_config.image_size // config.vision_config.patch_size
        if rows.shape[0] == video_token_count(side, video.shape[0]) - 1:
            rows = torch.cat([rows, self.inner.image_newline[None].to(rows)])
        return rows
