"""Gallery panels: an input image as the model saw it, with the visual tokens a run kept.

Token k of an image (merge order) covers cell (k // cells_w, k % cells_w) of `factor` x
`factor` pixels of the resized image (factor = patch 14 x merge 2 for Qwen-VL). For videos the
first frame is shown with the first temporal group's tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from sparsevlm.preprocess import QwenVLProcessor, smart_resize

from ..media import decode_image, decode_video, fetch_bytes
from ..model_source import resolve_model


def first_frame(value, kind: str, media: dict) -> Image.Image:
    data = fetch_bytes(value)
    if kind == "image":
        return decode_image(data, media["max_image_pixels"]).convert("RGB")
    return decode_video(data, media["num_frames"], media["fps"], media["max_frames"]).images[0].convert("RGB")


def load_media(input_uri: str, id_column: str, media_column: str, ids: list) -> dict:
    """{id: media cell} for the given ids, read from the input Parquet."""
    dataset = pads.dataset(input_uri, format="parquet")
    table = dataset.to_table(columns=[id_column, media_column],
                             filter=pc.field(id_column).isin(ids))
    return dict(zip(table.column(id_column).to_pylist(), table.column(media_column).to_pylist()))


@functools.lru_cache(maxsize=8)
def _vision_config(model_path: str, kind: str, max_pixels: int | None):
    processor = QwenVLProcessor.from_pretrained(resolve_model(model_path))
    cfg = processor.image_cfg if kind == "image" else processor.video_cfg
    return dataclasses.replace(cfg, max_pixels=max_pixels) if max_pixels else cfg


def panel(frame: Image.Image, positions: list[int], model_path: str, kind: str, max_pixels: int | None,
          title: str) -> dict:
    cfg = _vision_config(model_path, kind, max_pixels)
    height, width = smart_resize(frame.height, frame.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    cells_h, cells_w = height // cfg.factor, width // cfg.factor
    kept = np.zeros(cells_h * cells_w, dtype=bool)
    first_group = [p for p in positions if p < kept.size]
    kept[first_group] = True
    image = np.asarray(frame.resize((width, height), Image.Resampling.BICUBIC))
    return {"title": f"{title}: {int(kept.sum())}/{kept.size} kept", "image": image,
            "kept": kept.reshape(cells_h, cells_w)}
