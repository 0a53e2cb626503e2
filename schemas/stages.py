"""Arrow schema of the rows between the CPU stage and the GPU stage.

The CPU stage decodes, resizes and tokenises; what crosses to the GPU actors is uint8 pixels
and small integer columns (no pickled objects), so a row costs a quarter of the float
patches' bytes and needs no unpickling. The GPU stage turns them back into the engine's
sample without redoing any per-sample host work (positions are computed once, here).
"""

from __future__ import annotations

import pyarrow as pa

_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("id", pa.string(), "the input row's id (its input type is kept)"),
    ("task", pa.string(), "caption or vqa"),
    ("prompt", pa.string(), "the question / instruction actually used"),
    ("media_kind", pa.string(), "image or video"),
    ("frames_sampled", pa.int32(), "video frames decoded (0 for images)"),
    ("preprocess_ms", pa.float32(), "fetch + decode + processor"),
    ("error", pa.string(), "null, or '<stage>: <why>' (the row then skips the engine)"),
    ("input_ids", pa.list_(pa.int32()), "the chat-templated prompt, visual pad tokens expanded"),
    ("position_ids", pa.list_(pa.int32()), "the model's position ids, (P, L) flattened row by row"),
    ("pixels", pa.large_binary(), "uint8 frames of every visual item, resized, back to back"),
    ("pixel_shapes", pa.list_(pa.list_(pa.int32())), "(T, H, W, 3) of each visual item in `pixels`"),
    ("grid_thw", pa.list_(pa.list_(pa.int32())), "the vision grid of each visual item"),
    ("second_per_grid_ts", pa.list_(pa.float32()), "video time step per grid (Qwen2.5-VL), else null"),
]

PREPROCESSED_COLUMNS: tuple[str, ...] = tuple(name for name, _, _ in _COLUMNS)


def preprocessed_schema(id_type: pa.DataType = pa.string()) -> pa.Schema:
    return pa.schema([pa.field(name, id_type if name == "id" else dtype) for name, dtype, _ in _COLUMNS])
