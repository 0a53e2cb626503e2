"""GPU stage: one continuously batched `VLMEngine` per actor (one GPU), several Ray batches in flight.

Ray Data calls `Predictor.__call__` (async) for several batches at once
(`resources.batches_in_flight`); each hands its samples to the actor's `EngineLoop` and awaits
them, so the engine always has the next batch's samples queued and the GPU never waits for
Ray. A batch's rows come back when its last sample finishes; its samples leave the engine as
each finishes, making room for others. Per-sample host work (positions, checks) was done by
the CPU stage; here the uint8 frames go into pinned memory and are uploaded on a side stream.

A bad sample becomes its own error row. A device fault blames the rows in the engine and exits
the actor; Ray restarts it and retries; blamed rows then run alone (see faults.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import AsyncIterator

import pyarrow as pa
import torch

from schemas.config import GenerationConfig, ModelConfig, ResourcesConfig, SparsitySection
from schemas.rows import OUTPUT_COLUMNS, output_schema
from sparsevlm import EngineConfig, SamplingParams, VLMEngine
from sparsevlm.engine import is_device_fault

from .engine_loop import EngineLoop
from .faults import MAX_FAULTS, SharedExclusive, exhausted_error, exit_for_restart, maybe_inject
from .model_source import resolve_model
from .preprocess import from_columns

logger = logging.getLogger(__name__)
_PASSED_ON = ("id", "task", "prompt", "media_kind", "frames_sampled", "preprocess_ms", "error")


def worker_name() -> str:
    """host:pid, and the Ray node when under Ray: simulated nodes share a host name."""
    import ray

    name = f"{socket.gethostname()}:{os.getpid()}"
    return f"{name}:{ray.get_runtime_context().get_node_id()}" if ray.is_initialized() else name


class Predictor:
    def __init__(self, model_path: str, model_name: str, model: ModelConfig, sparsity: SparsitySection,
                 generation: GenerationConfig, resources: ResourcesConfig, ledger=None):
        self.model_name = model_name
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, model.dtype) if device == "cuda" else torch.float32
        self.sparsity = sparsity.engine_config()
        self.engine = VLMEngine.from_pretrained(resolve_model(model_path), dtype=dtype, device=device,
                                                sparsity=self.sparsity,
                                                engine_config=EngineConfig(max_num_seqs=resources.max_num_seqs,
                                                                          gpu_share=resources.gpus_per_actor,
                                                                          vision_fp8=model.vision_fp8))
        self.vision_precision = "fp8" if model.vision_fp8 else str(dtype).removeprefix("torch.")
        self.loop = EngineLoop(self.engine)
        self.params = SamplingParams(max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                                     top_p=generation.top_p, seed=generation.seed)
        self.worker = worker_name()
        self.on_gpu = device == "cuda"
        self.device = f"cuda:{torch.cuda.get_device_name(self.engine.device)}" if self.on_gpu else "cpu"
        self.ledger = ledger
        self.batches = 0
        self._warmup = asyncio.Lock() if resources.warmup else None
        self._warm = not resources.warmup
        self._gate = SharedExclusive()  # suspects of an earlier device fault run alone
        self._in_engine: dict = {}  # id -> samples of it in the engine now (what a fault blames)

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        self.batches += 1
        number = self.batches
        rows = batch.select(list(_PASSED_ON)).to_pylist()
        ids = [row["id"] for row in rows]
        faults = await self.ledger.faults.remote(ids) if self.ledger is not None else [0] * len(rows)
        samples: dict[int, object] = {}
        pixels = batch.column("pixels")
        columns = batch.select(["input_ids", "position_ids", "pixel_shapes", "grid_thw", "second_per_grid_ts"])
        for i, (row, fault_count) in enumerate(zip(rows, faults)):
            if row["error"] is not None:
                continue
            if fault_count >= MAX_FAULTS:
                row["error"] = exhausted_error(fault_count)
                continue
            try:
                sample = from_columns(columns.slice(i, 1).to_pylist()[0], row["media_kind"],
                                      pixels[i].as_buffer(), pin=self.on_gpu)
                samples[i] = self.engine.prepare(sample, i)
            except ValueError as error:
                row["error"] = f"predict: {error}"
        suspects = [i for i in samples if faults[i]]
        trusted = [i for i in samples if not faults[i]]
        results: dict[int, tuple] = {}
        if not self._warm:
            async with self._warmup:
                if not self._warm:  # the first batch runs twice; its first run's timings are dropped
                    async with self._gate.shared():
                        await self._run([(ids[i], samples[i]) for i in trusted])
                    self._warm = True
        started_at = time.time()
        if trusted:
            async with self._gate.shared():
                results.update(zip(trusted, await self._run([(ids[i], samples[i]) for i in trusted])))
        for i in suspects:
            async with self._gate.exclusive():
                results.update(zip([i], await self._run([(ids[i], samples[i])])))
        peak_mb = torch.cuda.max_memory_allocated(self.engine.device) / 2**20 if self.on_gpu else None
        out = []
        for i, row in enumerate(rows):
            record = dict.fromkeys(OUTPUT_COLUMNS)
            record.update(row, model=self.model_name, method=self.sparsity.label,
                          vision_precision=self.vision_precision, worker=self.worker,
                          batch=number, device=self.device)
            out.append(record)
        for i, (result, finished_at) in results.items():
            record = out[i]
            record.update(started_at=started_at, finished_at=finished_at, peak_gpu_memory_mb=peak_mb)
            error = result if isinstance(result, BaseException) else result.error
            if error is not None:
                record["error"] = f"predict: {type(error).__name__}: {error}"
                continue
            stats = result.stats.as_dict()
            record["output"] = result.text
            for name in OUTPUT_COLUMNS:
                if name in stats:
                    record[name] = stats[name]
            record["kept_per_pruning_layer"] = list(stats["kept_per_pruning_layer"].items())
        yield pa.Table.from_pylist(out, schema=output_schema(batch.schema.field("id").type))

    async def _run(self, work: list[tuple]) -> list[tuple]:
        """(id, sample) pairs -> (GenerationResult or the exception it failed with, Unix time it
        finished) each. A device fault, here or in the engine, blames what is in the engine and exits."""
        for row_id, _ in work:
            self._in_engine[row_id] = self._in_engine.get(row_id, 0) + 1
        finished_at: list[float] = [0.0] * len(work)
        try:
            maybe_inject([row_id for row_id, _ in work])
            futures = []
            for index, (_, sample) in enumerate(work):
                future = self.loop.submit(sample, self.params)
                future.add_done_callback(lambda _, index=index: finished_at.__setitem__(index, time.time()))
                futures.append(asyncio.wrap_future(future))
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        except Exception as error:
            outcomes = [error]
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and (is_device_fault(outcome) or self.loop.fault is not None):
                exit_for_restart(outcome, self.ledger, list(self._in_engine))
        for row_id, _ in work:
            self._in_engine[row_id] -= 1
            if not self._in_engine[row_id]:
                del self._in_engine[row_id]
        if len(outcomes) != len(work):  # an unexpected error before anything ran: every sample fails with it
            outcomes = outcomes * len(work)
        return list(zip(outcomes, finished_at))
