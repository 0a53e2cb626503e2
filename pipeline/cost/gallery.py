"""Gallery panels: an input image as the model saw it, with the visual tokens a run kept.

Where each token sits is the model family's knowledge (`first_token_grid` of its adapter): the
first rows x columns visual tokens tile the frame as the tower sees it. For videos the first
frame is shown with the first frame group's tokens.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from sparsevlm.adapters import adapter_class_for

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
def _family(model_path: str, max_pixels: int | None):
    """(adapter class, processor) of the model, with the run's pixel bound where it has one."""
    from transformers import AutoConfig

    path = resolve_model(model_path)
    config = AutoConfig.from_pretrained(path)
    adapter = adapter_class_for(config.model_type)
    processor = adapter.load_processor(path, config)
    if max_pixels:
        processor.bound_pixels(None, max_pixels)
    return adapter, processor


def panel(frame: Image.Image, positions: list[int], model_path: str, kind: str, max_pixels: int | None,
          title: str) -> dict:
    adapter, processor = _family(model_path, max_pixels)
    image, cells_h, cells_w = adapter.first_token_grid(processor, frame, kind)
    kept = np.zeros(cells_h * cells_w, dtype=bool)
    first_group = [p for p in positions if p < kept.size]
    kept[first_group] = True
    return {"title": f"{title}: {int(kept.sum())}/{kept.size} kept", "image": image,
            "kept": kept.reshape(cells_h, cells_w)}
