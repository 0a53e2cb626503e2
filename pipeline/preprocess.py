"""CPU stage: a batch of input rows -> processor outputs (or error rows), one per row.

Runs in Ray actors (the tokenizer and processor load once per actor). Nothing raises out
of `__call__` for a bad row: its `error` says which step failed and why.
"""

from __future__ import annotations

import dataclasses
import pickle
import time

import numpy as np
import pyarrow as pa

from sparsevlm.preprocess import QwenVLProcessor

from .media import MediaError, decode_image, decode_video, fetch_bytes
from .model_source import resolve_model

DEFAULT_PROMPTS = {
    ("caption", "image"): "Describe this image in one or two sentences.",
    ("caption", "video"): "Describe what happens in this video.",
}
STAGE_COLUMNS = ("id", "task", "prompt", "media_kind", "frames_sampled", "preprocess_ms", "error", "sample")


class Preprocessor:
    def __init__(self, model_path: str, kind: str, job: dict):
        """`kind`: "image" or "video"; `job`: JobConfig.model_dump()."""
        self.kind = kind
        self.input, self.media, self.generation = job["input"], job["media"], job["generation"]
        self.media_column = self.input["media_column"] or kind
        self.processor = QwenVLProcessor.from_pretrained(resolve_model(model_path))
        bounds = {k: self.media[k] for k in ("min_pixels", "max_pixels") if self.media[k] is not None}
        if bounds:  # otherwise the model's own preprocessor config decides
            self.processor.image_cfg = dataclasses.replace(self.processor.image_cfg, **bounds)
            self.processor.video_cfg = dataclasses.replace(self.processor.video_cfg, **bounds)

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: [] for name in STAGE_COLUMNS}
        ids = batch.column(self.input["id_column"]).to_pylist()
        media = batch.column(self.media_column).to_pylist()
        prompts = (batch.column(self.input["prompt_column"]).to_pylist()
                   if self.input["prompt_column"] in batch.column_names else [None] * len(ids))
        for row_id, value, prompt in zip(ids, media, prompts):
            started = time.perf_counter()
            row = {"id": row_id, "task": self.generation["task"], "media_kind": self.kind, "frames_sampled": 0,
                   "error": None, "sample": None}
            try:
                row["prompt"] = self._prompt(prompt)
                sample, frames = self._process(value, row["prompt"])
                row["frames_sampled"] = frames
                row["sample"] = pickle.dumps({k: v.numpy() for k, v in sample.items()}, protocol=5)
            except (MediaError, ValueError) as error:
                stage = "decode" if isinstance(error, MediaError) else "input"
                row.setdefault("prompt", prompt)
                row["error"] = f"{stage}: {error}"
            except Exception as error:  # a bug or an unexpected library error: keep the job going, say what
                row.setdefault("prompt", prompt)
                row["error"] = f"preprocess: {type(error).__name__}: {error}"
            row["preprocess_ms"] = 1e3 * (time.perf_counter() - started)
            for name in STAGE_COLUMNS:
                columns[name].append(row[name])
        return pa.table({
            "id": pa.array(columns["id"], type=batch.schema.field(self.input["id_column"]).type),
            "task": pa.array(columns["task"], pa.string()), "prompt": pa.array(columns["prompt"], pa.string()),
            "media_kind": pa.array(columns["media_kind"], pa.string()),
            "frames_sampled": pa.array(columns["frames_sampled"], pa.int32()),
            "preprocess_ms": pa.array(columns["preprocess_ms"], pa.float32()),
            "error": pa.array(columns["error"], pa.string()), "sample": pa.array(columns["sample"], pa.binary()),
        })

    def _prompt(self, prompt) -> str:
        if prompt is None:
            default = self.generation["prompt"] or DEFAULT_PROMPTS.get((self.generation["task"], self.kind))
            if default is None:
                raise ValueError("the row has no prompt and generation.prompt is not set (vqa needs a question)")
            return default
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt

    def _process(self, value, prompt: str) -> tuple[dict, int]:
        data = fetch_bytes(value)
        content = [{"type": self.kind}, {"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}])
        if self.kind == "image":
            image = decode_image(data, self.media["max_image_pixels"])
            sample, frames = self.processor(text=[text], images=[image]), 0
        else:
            video = decode_video(data, self.media["num_frames"], self.media["fps"], self.media["max_frames"])
            sample = self.processor(text=[text], videos=[video.images], video_fps=video.fps)
            frames = len(video.images)
        n_tokens = int(sample["input_ids"].shape[1])
        limit = self.generation["max_prompt_tokens"]
        if n_tokens > limit:
            raise ValueError(f"prompt has {n_tokens} tokens (text + visual), over generation.max_prompt_tokens="
                             f"{limit}")
        return sample, frames


def unpack_sample(blob: bytes) -> dict:
    """The stage's `sample` column back into what `VLMEngine.generate` takes."""
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in pickle.loads(blob).items()}
