"""Qwen-VL preprocessing on numpy + Pillow (no torchvision).

transformers' Qwen-VL processors cannot be constructed without torchvision, which has no
CPU wheel for our CI. `QwenVLProcessor` reproduces what `AutoProcessor` returns for ONE
sample: smart resize between min/max pixels, rescale + normalise, temporal grouping,
patch flattening in the spatial-merge order, `*_grid_thw`, expansion of the image/video
pad tokens in the chat-templated prompt and `mm_token_type_ids`.

Images follow transformers' PIL backend bit for bit (PIL bicubic on uint8). Video frames
use the same resize, so they differ from the torchvision video processor only by the
resize kernel's rounding (see tests/test_preprocess.py for the tolerance).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
TOKEN_TYPE_TEXT, TOKEN_TYPE_IMAGE, TOKEN_TYPE_VIDEO = 0, 1, 2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest (h, w) divisible by `factor` with min_pixels <= h*w <= max_pixels, aspect kept."""
    if min(height, width) < 1:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_clip(num_frames: int, height: int, width: int, factor: int, temporal_factor: int,
                      min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video resize: the pixel bounds hold for the whole clip (T x H x W), not per frame
    (transformers' Qwen3VLVideoProcessor without its optional per-frame cap)."""
    num_frames = max(num_frames, temporal_factor)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """One `preprocessor_config.json` (images) or `video_preprocessor_config.json` (videos)."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_json(cls, path: Path, default_min: int, default_max: int) -> "VisionPreprocessConfig":
        raw = json.loads(path.read_text()) if path.exists() else {}
        size = raw.get("size") or {}
        return cls(
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or default_min),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or default_max),
            patch_size=int(raw.get("patch_size", 14)),
            temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
            merge_size=int(raw.get("merge_size", 2)),
            image_mean=tuple(raw.get("image_mean", cls.image_mean)),
            image_std=tuple(raw.get("image_std", cls.image_std)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def _to_rgb_uint8(image) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"array images must be uint8 HxWxC with C in (1, 3, 4), got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_frame(frame: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of uint8, as transformers' PIL backend does: (H, W, 3) uint8."""
    height, width = size
    return np.asarray(frame.resize((width, height), resample=Image.Resampling.BICUBIC))


def normalization_table(cfg: VisionPreprocessConfig) -> np.ndarray:
    """(256, 3) float32: the normalised value of each uint8 level per channel, computed as
    transformers does (float64 rescale, float32 cast, float32 normalise); a lookup then gives
    bit-identical pixels on CPU or GPU."""
    levels = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)[:, None]
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return (levels - mean) / std


def normalize_frames(frames, table):
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32 through `normalization_table`; numpy or torch alike."""
    if isinstance(frames, np.ndarray):
        return table[frames, np.arange(3)].transpose(0, 3, 1, 2)
    channels = torch.arange(3, device=frames.device)
    return table[frames.long(), channels].permute(0, 3, 1, 2)


def patchify(frames, cfg: VisionPreprocessConfig) -> tuple:
    """(T, C, H, W) float frames -> (grid_t*grid_h*grid_w, C*tp*p*p) patches in merge order, and grid_thw.

    T is padded to a multiple of the temporal patch by repeating the last frame
    (a single image becomes `temporal_patch_size` identical frames). Numpy arrays or
    torch tensors (the probe's training patchifies on the GPU).
    """
    num_frames, channels, height, width = frames.shape
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -num_frames % tp:
        last = frames[-1:]
        frames = (np.concatenate([frames, np.repeat(last, pad, axis=0)]) if isinstance(frames, np.ndarray)
                  else torch.cat([frames, last.expand(pad, *last.shape[1:])]))
    grid_t, grid_h, grid_w = frames.shape[0] // tp, height // p, width // p
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    order = (0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, C, tp, p, p
    patches = patches.transpose(order) if isinstance(patches, np.ndarray) else patches.permute(order)
    return patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p), (grid_t, grid_h, grid_w)


@functools.lru_cache(maxsize=8)
def _table(cfg: VisionPreprocessConfig) -> np.ndarray:
    return normalization_table(cfg)


def resized_image(image, cfg: VisionPreprocessConfig) -> np.ndarray:
    """(1, H, W, 3) uint8: the image as the vision tower sees it, before normalisation."""
    frame = _to_rgb_uint8(image)
    size = smart_resize(frame.height, frame.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return resize_frame(frame, size)[None]


def resized_video(frames: Sequence, cfg: VisionPreprocessConfig, clip_budget: bool = False) -> np.ndarray:
    """(T, H, W, 3) uint8 of the already-sampled frames (PIL images or uint8 HxWxC arrays).
    `clip_budget`: the pixel bounds are for the whole clip (Qwen3-VL), else per frame."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    frames = [_to_rgb_uint8(f) for f in frames]
    if clip_budget:
        size = smart_resize_clip(len(frames), frames[0].height, frames[0].width, cfg.factor, cfg.temporal_patch_size,
                                 cfg.min_pixels, cfg.max_pixels)
    else:
        size = smart_resize(frames[0].height, frames[0].width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return np.stack([resize_frame(f, size) for f in frames])


def frames_grid(frames: np.ndarray, cfg: VisionPreprocessConfig) -> tuple[int, int, int]:
    """grid_thw of (T, H, W, 3) frames: T padded to the temporal patch, as `patchify` pads it."""
    return (-(-frames.shape[0] // cfg.temporal_patch_size), frames.shape[1] // cfg.patch_size,
            frames.shape[2] // cfg.patch_size)


def library_normalization_table(image_processor) -> np.ndarray:
    """(256, 3) float32: each uint8 level per channel through a transformers PIL image processor's
    own rescale and normalise (the steps it runs on a resized image), so a lookup reproduces them."""
    ip = image_processor
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    values = ip.normalize(ip.rescale(levels, ip.rescale_factor), ip.image_mean, ip.image_std)
    return np.ascontiguousarray(values[:, 0, :].T, dtype=np.float32)


class TokenizerFacade:
    """What every family's processor answers through its tokenizer (`self.tokenizer`)."""

    tokenizer = None

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)


class QwenVLProcessor(TokenizerFacade):
    """Drop-in for transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor, one sample per call.

        processor = QwenVLProcessor.from_pretrained(path)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        sample = processor(text=[prompt], images=[img], return_tensors="pt")
    """

    media_kinds = ("image", "video")

    def __init__(self, tokenizer, image_cfg: VisionPreprocessConfig, video_cfg: VisionPreprocessConfig,
                 with_second_per_grid_ts: bool, timestamped_videos: bool = False):
        """`timestamped_videos` (Qwen3-VL): each frame group of a video is its own visual span
        after a "<t seconds>" text, and the video pixel bounds hold for the whole clip."""
        self.tokenizer = tokenizer
        self.image_cfg, self.video_cfg = image_cfg, video_cfg
        self.with_second_per_grid_ts = with_second_per_grid_ts
        self.timestamped_videos = timestamped_videos
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, path: str | Path, model_type: str | None = None, **tokenizer_kwargs) -> "QwenVLProcessor":
        from transformers import AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        if model_type is None and (path / "config.json").exists():
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        image_cfg = VisionPreprocessConfig.from_json(path / "preprocessor_config.json", 56 * 56, 28 * 28 * 1280)
        video_json = path / "video_preprocessor_config.json"
        video_cfg = (VisionPreprocessConfig.from_json(video_json, 128 * 28 * 28, 28 * 28 * 768)
                     if video_json.exists() else image_cfg)
        return cls(tokenizer, image_cfg, video_cfg, with_second_per_grid_ts=model_type == "qwen2_5_vl",
                   timestamped_videos=model_type == "qwen3_vl")

    def bound_pixels(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Override the checkpoint's resize bounds (pixels per image / frame); None keeps its own."""
        bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.image_cfg = dataclasses.replace(self.image_cfg, **bounds)
        self.video_cfg = dataclasses.replace(self.video_cfg, **bounds)

    def __call__(self, text, images=None, videos=None, return_tensors: str = "pt", video_fps: float = 2.0,
                 return_frames: bool = False) -> dict:
        """`text`: one prompt (or a one-element list) containing one pad token per image/video.

        `video_fps`: the rate at which the frames were sampled (Qwen2.5-VL turns it into
        `second_per_grid_ts`, the time step of its temporal positions).
        `return_frames`: instead of float patches (`pixel_values*`), the resized uint8 frames
        (`image_frames` / `video_frames`: one (T, H, W, 3) tensor per image / video); the engine
        normalises and patchifies them on its device, to the same values. A quarter of the
        bytes to move, and the arithmetic leaves the CPU.
        """
        if isinstance(text, (list, tuple)):
            if len(text) != 1:
                raise ValueError(f"QwenVLProcessor handles one sample per call; got {len(text)} prompts")
            text = text[0]
        if return_tensors != "pt":
            raise ValueError("QwenVLProcessor returns torch tensors only (return_tensors='pt')")
        images = list(images or [])
        videos = list(videos or [])
        out: dict[str, torch.Tensor] = {}
        image_tokens: list[int] = []
        video_tokens: list[int] = []
        if images:
            image_tokens = self._visual(out, "image", "pixel_values", [resized_image(im, self.image_cfg) for im in images],
                                        self.image_cfg, return_frames)
        if videos:
            resized = [resized_video(v, self.video_cfg, clip_budget=self.timestamped_videos) for v in videos]
            video_tokens = self._visual(out, "video", "pixel_values_videos", resized, self.video_cfg, return_frames)
            if self.with_second_per_grid_ts:
                out["second_per_grid_ts"] = torch.tensor([self.video_cfg.temporal_patch_size / video_fps] * len(videos))
        text = expand_placeholders(text, IMAGE_PAD, image_tokens, "image")
        if self.timestamped_videos and videos:
            text = _timestamped_videos(text, out["video_grid_thw"].tolist(), [len(v) for v in resized],
                                       video_fps, self.video_cfg)
        else:
            text = expand_placeholders(text, VIDEO_PAD, video_tokens, "video")
        input_ids = torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)
        token_type = torch.zeros_like(input_ids, dtype=torch.int32)
        token_type[input_ids == self.image_token_id] = TOKEN_TYPE_IMAGE
        token_type[input_ids == self.video_token_id] = TOKEN_TYPE_VIDEO
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": token_type, **out}

    @staticmethod
    def _visual(out: dict, kind: str, pixel_key: str, resized: list[np.ndarray], cfg: VisionPreprocessConfig,
                return_frames: bool) -> list[int]:
        """Fill `out` with one kind's pixels (patches or frames) and grids; -> visual tokens per item."""
        grids = [frames_grid(frames, cfg) for frames in resized]
        if return_frames:
            out[f"{kind}_frames"] = [torch.from_numpy(f if f.flags.writeable else f.copy()) for f in resized]
        else:
            out[pixel_key] = torch.from_numpy(np.concatenate(
                [patchify(normalize_frames(frames, _table(cfg)), cfg)[0] for frames in resized]))
        out[f"{kind}_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return [t * h * w // cfg.merge_size ** 2 for t, h, w in grids]

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def frame_group_times(num_frames: int, fps: float, temporal_patch: int) -> list[float]:
    """Qwen3-VL's timestamp of each frame group: the mean time of its frames (frame i at i / fps;
    the last frame repeated up to the temporal patch, as the pixels are)."""
    times = [i / fps for i in range(num_frames)] + [(num_frames - 1) / fps] * (-num_frames % temporal_patch)
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]


def _timestamped_videos(text: str, grids: list[list[int]], frame_counts: list[int], fps: float,
                        cfg: VisionPreprocessConfig) -> str:
    """Each video's span becomes "<t seconds><|vision_start|>pads<|vision_end|>" per frame group."""
    wrapped = f"{VISION_START}{VIDEO_PAD}{VISION_END}"
    marker = wrapped if text.count(wrapped) == text.count(VIDEO_PAD) else VIDEO_PAD
    pieces = text.split(marker)
    if len(pieces) - 1 != len(grids):
        raise ValueError(f"prompt has {len(pieces) - 1} {VIDEO_PAD} token(s) but {len(grids)} video(s) were given; "
                         f"put one {VIDEO_PAD} per video in the prompt (apply_chat_template does this)")
    expanded = [pieces[0]]
    for (t, h, w), frames, piece in zip(grids, frame_counts, pieces[1:]):
        per_group = VIDEO_PAD * (h * w // cfg.merge_size ** 2)
        times = frame_group_times(frames, fps, cfg.temporal_patch_size)
        expanded += [f"<{time:.1f} seconds>{VISION_START}{per_group}{VISION_END}" for time in times[:t]] + [piece]
    return "".join(expanded)


def expand_placeholders(text: str, token: str, counts: list[int], kind: str) -> str:
    """Each occurrence of `token` in a prompt repeated counts[i] times (one per visual token)."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"prompt has {len(pieces) - 1} {token} token(s) but {len(counts)} {kind}(s) were given; "
                         f"put one {token} per {kind} in the prompt (apply_chat_template does this)")
    expanded = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        expanded += [token * count, piece]
    return "".join(expanded)
