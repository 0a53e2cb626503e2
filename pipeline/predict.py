"""GPU stage: one `VLMEngine` per actor (one GPU); a Ray batch in, output rows out.

The engine packs the whole batch. A batch that fails as a whole is retried sample by
sample so that one bad sample becomes one error row and the rest still get answers.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import pyarrow as pa
import torch

from schemas.rows import OUTPUT_COLUMNS, output_schema
from sparsevlm import SamplingParams, SparsityConfig, VLMEngine

from .model_source import resolve_model
from .preprocess import unpack_sample

logger = logging.getLogger(__name__)


def engine_sparsity(section: dict) -> SparsityConfig:
    keys = ("method", "preset", "keep_ratio", "schedule", "recycle", "rank_adaptive", "seed")
    return SparsityConfig(**{k: section[k] for k in keys if section.get(k) is not None})


class Predictor:
    def __init__(self, model_path: str, model_name: str, job: dict):
        self.model_name = model_name
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, job["model"]["dtype"]) if device == "cuda" else torch.float32
        self.sparsity = engine_sparsity(job["sparsity"])
        self.engine = VLMEngine.from_pretrained(resolve_model(model_path), dtype=dtype, device=device,
                                                sparsity=self.sparsity)
        generation = job["generation"]
        self.params = SamplingParams(max_new_tokens=generation["max_new_tokens"],
                                     temperature=generation["temperature"], top_p=generation["top_p"],
                                     seed=generation["seed"])
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.on_gpu = device == "cuda"
        self.device = f"cuda:{torch.cuda.get_device_name(self.engine.device)}" if self.on_gpu else "cpu"
        self.batches = 0
        self.warmup = job["resources"]["warmup"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        rows = batch.drop_columns(["sample"]).to_pylist()
        blobs = batch.column("sample").to_pylist()
        todo = [i for i, row in enumerate(rows) if row["error"] is None]
        samples = [unpack_sample(blobs[i]) for i in todo]
        if self.warmup and self.batches == 1:
            self._generate(samples)
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.engine.device)
        started_at = time.time()
        results = self._generate(samples)
        peak_mb = torch.cuda.max_memory_allocated(self.engine.device) / 2**20 if self.on_gpu else None
        finished_at = time.time()
        out = []
        for row in rows:
            record = dict.fromkeys(OUTPUT_COLUMNS)
            record.update(row, model=self.model_name, method=self.sparsity.label, worker=self.worker,
                          batch=self.batches, device=self.device, started_at=started_at,
                          finished_at=finished_at, peak_gpu_memory_mb=peak_mb)
            out.append(record)
        for i, result in zip(todo, results):
            if isinstance(result, Exception):
                out[i]["error"] = f"predict: {type(result).__name__}: {result}"
                continue
            stats = result.stats.as_dict()
            out[i]["output"] = result.text
            for name in OUTPUT_COLUMNS:
                if name in stats:
                    out[i][name] = stats[name]
            out[i]["kept_per_pruning_layer"] = list(stats["kept_per_pruning_layer"].items())
        return pa.Table.from_pylist(out, schema=output_schema(batch.schema.field("id").type))

    def _generate(self, samples: list[dict]) -> list:
        if not samples:
            return []
        try:
            return self.engine.generate(samples, self.params)
        except Exception as error:  # isolate the culprit: each sample alone
            logger.warning("batch of %d failed (%s); retrying sample by sample", len(samples), error)
            results = []
            for sample in samples:
                try:
                    results.append(self.engine.generate([sample], self.params)[0])
                except Exception as single:
                    results.append(single)
            return results
