"""Actor sizing and the stages' actors (warm-up, timing columns, what crosses the boundary), without Ray."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from pipeline.media import decode_image
from pipeline.model_source import TINY_MODEL
from pipeline.predict import Predictor
from pipeline.preprocess import Preprocessor
from pipeline.run import actor_sizes
from schemas import JobConfig

SAMPLES = Path(__file__).resolve().parent.parent / "jobs" / "sample_data"


def test_small_jobs_start_no_idle_actors():
    config = JobConfig.load(overrides={"resources.cpu_actors": 8, "resources.batch_size": 64})
    sizes = actor_sizes(config, rows_to_do=4, gpus=2, cpus=32)
    assert (sizes.gpu_actors, sizes.cpu_actors, sizes.use_gpu) == (1, 1, True)
    sizes = actor_sizes(config, rows_to_do=1000, gpus=2, cpus=32)
    assert (sizes.gpu_actors, sizes.cpu_actors, sizes.actor_cpus) == (2, 8, 1.0)


def test_a_gpu_share_puts_several_engines_on_each_gpu():
    config = JobConfig.load(overrides={"resources.gpus_per_actor": 0.5, "resources.cpu_actors": 4})
    assert actor_sizes(config, rows_to_do=10_000, gpus=2, cpus=32).gpu_actors == 4
    assert actor_sizes(config, rows_to_do=10_000, gpus=0, cpus=32).gpu_actors == 1  # CPU engines: no share
    from sparsevlm import EngineConfig

    with pytest.raises(ValueError, match="gpu_share"):
        EngineConfig(gpu_share=0)


def test_autoscaling_clusters_get_gpus_and_the_configured_cpu_actors():
    config = JobConfig.load(overrides={"resources.use_gpu": True, "resources.gpu_actors": 4,
                                       "resources.cpu_actors": 48})
    sizes = actor_sizes(config, rows_to_do=100_000, gpus=0, cpus=0)  # only the head is up yet
    assert (sizes.gpu_actors, sizes.cpu_actors, sizes.actor_cpus, sizes.use_gpu) == (4, 48, 1.0, True)
    plain = actor_sizes(JobConfig.load(), rows_to_do=100_000, gpus=0, cpus=2)  # a laptop: CPU engines
    assert not plain.use_gpu and plain.cpu_actors == 1 and plain.actor_cpus == 0.5


def _call(predictor, stage: pa.Table) -> pa.Table:
    async def collect():
        return [table async for table in predictor(stage)]

    (table,) = asyncio.run(collect())
    return table


def test_warmup_runs_the_first_batch_twice_and_times_the_second():
    config = JobConfig.load(overrides={"generation.max_new_tokens": 2, "resources.warmup": True})
    photos = pq.read_table(SAMPLES / "images.parquet").slice(0, 2)
    stage = Preprocessor(TINY_MODEL, "image", config.input, config.media, config.generation)(photos)
    predictor = Predictor(TINY_MODEL, "tiny", config.model, config.sparsity, config.generation, config.resources)
    calls = []
    submit = predictor.loop.submit
    predictor.loop.submit = lambda sample, params: calls.append(sample.index) or submit(sample, params)
    first = _call(predictor, stage)
    second = _call(predictor, stage)
    assert calls == [0, 1, 0, 1, 0, 1]  # warm-up + timed, then timed only
    for out in (first, second):
        rows = out.to_pylist()
        assert all(r["started_at"] <= r["finished_at"] and r["device"] == "cpu" for r in rows)
        assert all(r["peak_gpu_memory_mb"] is None and r["error"] is None for r in rows)
    assert max(first.column("finished_at").to_pylist()) <= second.column("started_at")[0].as_py()
    assert isinstance(first, pa.Table) and first.column("batch").to_pylist() == [1, 1]
    predictor.loop.close()


def test_the_gpu_stage_rebuilds_the_cpu_stage_sample_exactly():
    """uint8 frames and positions through Arrow: the engine answers as it does on the processor's own output."""
    config = JobConfig.load(overrides={"generation.max_new_tokens": 5, "generation.task": "caption"})
    photos = pq.read_table(SAMPLES / "images.parquet").slice(0, 3)
    stage = Preprocessor(TINY_MODEL, "image", config.input, config.media, config.generation)(photos)
    predictor = Predictor(TINY_MODEL, "tiny", config.model, config.sparsity, config.generation, config.resources)
    out = _call(predictor, stage).to_pylist()
    engine = predictor.engine
    processor = engine.processor
    for row, data in zip(out, photos.column("image").to_pylist()):
        image = decode_image(data, 10**8)
        content = [{"type": "image"}, {"type": "text", "text": row["prompt"]}]
        sample = processor(text=[processor.apply_chat_template([{"role": "user", "content": content}])],
                           images=[image])
        alone = engine.generate([sample], predictor.params)[0]
        assert row["output"] == alone.text and row["n_generated_tokens"] == len(alone.token_ids)
    predictor.loop.close()


def test_vision_fp8_reaches_the_engine_and_every_row_says_so():
    config = JobConfig.load(overrides={"generation.max_new_tokens": 2, "model.vision_fp8": True})
    photos = pq.read_table(SAMPLES / "images.parquet").slice(0, 2)
    stage = Preprocessor(TINY_MODEL, "image", config.input, config.media, config.generation)(photos)
    predictor = Predictor(TINY_MODEL, "tiny", config.model, config.sparsity, config.generation, config.resources)
    assert predictor.engine.config.vision_fp8 and predictor.engine.adapter._tower_swaps
    rows = _call(predictor, stage).to_pylist()
    assert [(r["vision_precision"], r["error"]) for r in rows] == [("fp8", None)] * 2
    predictor.loop.close()
    plain = JobConfig.load(overrides={"generation.max_new_tokens": 2})
    predictor = Predictor(TINY_MODEL, "tiny", plain.model, plain.sparsity, plain.generation, plain.resources)
    assert {r["vision_precision"] for r in _call(predictor, stage).to_pylist()} == {"float32"}  # CPU runs fp32
    predictor.loop.close()
