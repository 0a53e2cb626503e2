"""Arrow schema of output rows: one row per input id, answer or error, plus per-sample stats.

Every column name the pipeline, the jobs and the cost report use is defined here.
"""

from __future__ import annotations

import pyarrow as pa

# (name, type, meaning); the order is the column order in the Parquet files.
_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("id", pa.string(), "the input row's id (its input type is kept when the schema is built with it)"),
    ("task", pa.string(), "caption or vqa"),
    ("prompt", pa.string(), "the question / instruction actually used"),
    ("output", pa.string(), "generated text; null when the row failed"),
    ("error", pa.string(), "null when the row succeeded; else '<stage>: <what failed and why>'"),
    ("model", pa.string(), "model path or hub id"),
    ("method", pa.string(), "sparsification, e.g. none or sparsevlm-128"),
    ("vision_precision", pa.string(), "the vision tower's GEMMs: the model's dtype (bfloat16, float32), or fp8 "
                                      "(model.vision_fp8)"),
    ("media_kind", pa.string(), "image, video or none"),
    ("frames_sampled", pa.int32(), "video frames decoded (0 for images)"),
    ("n_prompt_tokens", pa.int32(), "prompt tokens, visual ones included"),
    ("n_visual_tokens", pa.int32(), "visual tokens before pruning"),
    ("n_visual_tokens_kept", pa.int32(), "visual tokens after the last pruning layer (merged ones included)"),
    ("equiv_visual_tokens", pa.float32(), "layer-averaged retained visual tokens"),
    ("budget_met", pa.bool_(), "false where the preset's layer average is out of reach at this model's depth "
                               "(pruned as far as it goes, over budget)"),
    ("kept_per_pruning_layer", pa.map_(pa.int32(), pa.int32()), "pruning layer -> visual tokens it passed on"),
    ("kept_visual_positions", pa.list_(pa.int32()), "indices of the original visual tokens that survived"),
    ("n_generated_tokens", pa.int32(), "new tokens, stop token included"),
    ("finish_reason", pa.string(), "stop (EOS or a stop id) or length"),
    ("prefill_flops", pa.float64(), "estimated decoder prefill FLOPs with pruning"),
    ("prefill_flops_dense", pa.float64(), "the same without pruning"),
    ("preprocess_ms", pa.float32(), "fetch + decode + processor, CPU stage"),
    ("vision_ms", pa.float32(), "vision tower, this sample's share"),
    ("prefill_ms", pa.float32(), "decoder prefill, this sample's share (sparsification included)"),
    ("sparse_ms", pa.float32(), "raters, scores, selection, recycling: part of prefill_ms"),
    ("decode_ms", pa.float32(), "decode steps, this sample's share"),
    ("worker", pa.string(), "the GPU actor that ran the row: host:pid:Ray node id"),
    ("device", pa.string(), "what it ran on: cpu, or cuda:<GPU name>"),
    ("batch", pa.int64(), "engine call counter within that worker"),
    ("started_at", pa.float64(), "Unix time (s) the row's engine call started (after any warm-up)"),
    ("finished_at", pa.float64(), "Unix time (s) it returned: throughput = rows / (last finish - first start)"),
    ("peak_gpu_memory_mb", pa.float32(), "peak GPU memory allocated during the row's engine call (null on CPU)"),
]

OUTPUT_COLUMNS: tuple[str, ...] = tuple(name for name, _, _ in _COLUMNS)
COLUMN_DOCS: dict[str, str] = {name: doc for name, _, doc in _COLUMNS}


def output_schema(id_type: pa.DataType = pa.string()) -> pa.Schema:
    """The output schema with the input's id type."""
    return pa.schema([pa.field(name, id_type if name == "id" else dtype) for name, dtype, _ in _COLUMNS])


OUTPUT_SCHEMA = output_schema()


def empty_row(row_id, **values) -> dict:
    """A row with every column present (null unless given); unknown names are a bug, not data."""
    unknown = set(values) - set(OUTPUT_COLUMNS)
    if unknown:
        raise KeyError(f"not output columns: {sorted(unknown)}")
    row = dict.fromkeys(OUTPUT_COLUMNS)
    row.update(values, id=row_id)
    return row


def markdown_table() -> str:
    """The column reference, for the README."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {dtype} | {doc} |" for name, dtype, doc in _COLUMNS]
    return "\n".join(lines)
