"""CPU stage: a batch of input rows -> engine-ready rows (or error rows), one per row.

Runs in Ray actors (tokenizer, processor and the family's host-side preparer load once per
actor): fetch, decode, resize to uint8 frames, tokenise, check, compute positions. What goes
to the GPU stage is declared in `schemas/stages.py`. Nothing raises out of `__call__` for a
bad row: its `error` says which step failed and why.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from schemas.config import GenerationConfig, InputConfig, MediaConfig
from schemas.stages import PREPROCESSED_COLUMNS, preprocessed_schema
from sparsevlm.adapters import adapter_class_for

from .media import MediaError, decode_image, decode_video, fetch_bytes
from .model_source import check_media_kind, resolve_model

DEFAULT_PROMPTS = {
    ("caption", "image"): "Describe this image in one or two sentences.",
    ("caption", "video"): "Describe what happens in this video.",
}


class Preprocessor:
    def __init__(self, model_path: str, kind: str, input: InputConfig, media: MediaConfig,
                 generation: GenerationConfig):
        """`kind`: "image" or "video"."""
        from transformers import AutoConfig

        self.kind = kind
        self.input, self.media, self.generation = input, media, generation
        self.media_column = input.media_column or kind
        path = resolve_model(model_path)
        config = AutoConfig.from_pretrained(path)
        adapter = adapter_class_for(config.model_type)
        self.processor = adapter.load_processor(path, config)
        self.preparer = adapter.load_preparer(config)
        check_media_kind(config.model_type, adapter, kind)
        if media.min_pixels is not None or media.max_pixels is not None:  # else the checkpoint's config decides
            self.processor.bound_pixels(media.min_pixels, media.max_pixels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        ids = batch.column(self.input.id_column).to_pylist()
        media = batch.column(self.media_column).to_pylist()
        prompts = (batch.column(self.input.prompt_column).to_pylist()
                   if self.input.prompt_column in batch.column_names else [None] * len(ids))
        for row_id, value, prompt in zip(ids, media, prompts):
            started = time.perf_counter()
            row = dict.fromkeys(PREPROCESSED_COLUMNS)
            row.update(id=row_id, task=self.generation.task, media_kind=self.kind, frames_sampled=0, prompt=prompt)
            try:
                row["prompt"] = self._prompt(prompt)
                row.update(self._process(value, row["prompt"]))
            except (MediaError, ValueError) as error:
                stage = "decode" if isinstance(error, MediaError) else "input"
                row["error"] = f"{stage}: {error}"
            except Exception as error:  # a bug or an unexpected library error: keep the job going, say what
                row["error"] = f"preprocess: {type(error).__name__}: {error}"
            row["preprocess_ms"] = 1e3 * (time.perf_counter() - started)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=preprocessed_schema(batch.schema.field(self.input.id_column).type))

    def _prompt(self, prompt) -> str:
        if prompt is None:
            default = self.generation.prompt or DEFAULT_PROMPTS.get((self.generation.task, self.kind))
            if default is None:
                raise ValueError("the row has no prompt and generation.prompt is not set (vqa needs a question)")
            return default
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt

    def _process(self, value, prompt: str) -> dict:
        data = fetch_bytes(value)
        content = [{"type": self.kind}, {"type": "text", "text": prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}])
        if self.kind == "image":
            image = decode_image(data, self.media.max_image_pixels)
            sample, frames = self.processor(text=[text], images=[image], return_frames=True), 0
        else:
            video = decode_video(data, self.media.num_frames, self.media.fps, self.media.max_frames)
            sample = self.processor(text=[text], videos=[video.images], video_fps=video.fps, return_frames=True)
            frames = len(video.images)
        n_tokens = int(sample["input_ids"].shape[1])
        limit = self.generation.max_prompt_tokens
        if n_tokens > limit:
            raise ValueError(f"prompt has {n_tokens} tokens (text + visual), over generation.max_prompt_tokens="
                             f"{limit}")
        prepared = self.preparer.prepare(sample, 0)  # checks, and the positions the engine would compute
        return dict(to_columns(sample, self.kind, prepared.positions), frames_sampled=frames)


def to_columns(sample: dict, kind: str, positions: torch.Tensor) -> dict:
    """One prepared sample as the stage's columns (schemas/stages.py)."""
    frames = [f.numpy() for f in sample[f"{kind}_frames"]]
    seconds = sample.get("second_per_grid_ts")
    return {"input_ids": sample["input_ids"][0].tolist(), "position_ids": positions.flatten().tolist(),
            "pixels": b"".join(np.ascontiguousarray(f).tobytes() for f in frames),
            "pixel_shapes": [list(f.shape) for f in frames], "grid_thw": sample[f"{kind}_grid_thw"].tolist(),
            "second_per_grid_ts": None if seconds is None else seconds.tolist()}


def from_columns(row: dict, kind: str, pixels, pin: bool = False) -> dict:
    """The stage's columns back into the sample `VLMEngine` takes (uint8 frames, given positions).
    `pin`: copy the frames straight into pinned memory (one copy, and the upload can be async)."""
    flat = np.frombuffer(pixels, dtype=np.uint8)
    frames, offset = [], 0
    for shape in row["pixel_shapes"]:
        size = int(np.prod(shape))
        frame = torch.empty(tuple(shape), dtype=torch.uint8, pin_memory=pin)
        frame.numpy()[...] = flat[offset:offset + size].reshape(shape)
        frames.append(frame)
        offset += size
    input_ids = torch.tensor(row["input_ids"], dtype=torch.long)[None]
    sample = {"input_ids": input_ids, "position_ids": torch.tensor(row["position_ids"], dtype=torch.long),
              f"{kind}_frames": frames, f"{kind}_grid_thw": torch.tensor(row["grid_thw"], dtype=torch.long)}
    if row.get("second_per_grid_ts") is not None:
        sample["second_per_grid_ts"] = torch.tensor(row["second_per_grid_ts"])
    return sample
