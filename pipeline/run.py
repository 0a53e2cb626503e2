"""The Ray Data graph of a labeling job, with resume and the one-row-per-id guarantee.

    read_parquet -> skip ids already written, and duplicated ids -> Preprocessor (CPU actors)
    -> Predictor (one engine per GPU) -> write_parquet

Duplicate ids: an id that occurs more than once in the input is not processed; it gets a
single error row saying so (which of its rows was meant is the user's call).
Resume: ids found in readable Parquet files of the output folder are skipped; files a
killed run left half-written are unreadable and are deleted first, so their rows run again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs

from schemas import JobConfig
from schemas.rows import empty_row, output_schema

from . import cluster
from .model_source import EMBEDDED_MODEL, EMBEDDED_NAMES, REPO, check_model

logger = logging.getLogger(__name__)
PREPROCESS_BATCH = 4  # rows per CPU-actor call: small, so decoding streams into engine batches
# the default inputs: procedural scenes with questions (and reference answers) the default model knows
SAMPLE_DATA = {"image": REPO / "jobs" / "sample_data" / "scenes_images.parquet",
               "video": REPO / "jobs" / "sample_data" / "scenes_videos.parquet"}


def _filesystem(uri: str) -> tuple[fs.FileSystem, str]:
    if "://" in uri:
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), str(Path(uri).resolve())


def read_ids(uri: str, id_column: str, media_column: str) -> pa.Array:
    filesystem, path = _filesystem(uri)
    dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
    for column in (id_column, media_column):
        if column not in dataset.schema.names:
            raise ValueError(f"input {uri} has no column {column!r} (columns: {dataset.schema.names}); "
                             "set input.id_column / input.media_column")
    return dataset.to_table(columns=[id_column]).column(id_column).combine_chunks()


def done_ids(uri: str) -> pa.Array | None:
    """Ids in the readable output files; deletes the unreadable ones (a killed run's leftovers)."""
    filesystem, path = _filesystem(uri)
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return None
    chunks = []
    for info in filesystem.get_file_info(fs.FileSelector(path, recursive=True)):
        if info.type != fs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        try:
            chunks.append(pq.read_table(info.path, columns=["id"], filesystem=filesystem).column("id"))
        except (OSError, pa.ArrowInvalid) as error:
            logger.warning("removing unreadable output file %s (%s); its rows will run again", info.path, error)
            filesystem.delete_file(info.path)
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks]).combine_chunks() if chunks else None


@dataclass
class Plan:
    input_uri: str
    output_uri: str
    model_path: str
    id_type: pa.DataType
    done: pa.Array | None  # ids already in the output (one read of it, before anything runs)
    to_skip: pa.Array  # ids already written or duplicated
    duplicates: list
    n_input: int
    n_done: int


def plan_job(config: JobConfig, kind: str) -> Plan:
    input_uri = config.input.uri or str(SAMPLE_DATA[kind])
    media_column = config.input.media_column or kind
    output_uri = config.output.uri or str(Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_model(config.model.path, kind)
    ids = read_ids(input_uri, config.input.id_column, media_column)
    if config.input.limit:
        ids = ids[:config.input.limit]
    counts = pc.value_counts(ids)
    duplicates = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    done = done_ids(output_uri)
    if done is not None:
        done = done.cast(ids.type)
        if not config.output.resume:
            raise ValueError(f"output {output_uri} already holds results and output.resume is off; "
                             "choose another output or turn resume on")
    skip = pa.concat_arrays([a for a in (done, pa.array(duplicates, ids.type)) if a is not None])
    n_done = 0 if done is None else int(pc.sum(pc.is_in(ids, value_set=done)).as_py() or 0)
    return Plan(input_uri, output_uri, config.model.path or EMBEDDED_MODEL, ids.type, done, skip, duplicates,
                len(ids), n_done)


def write_duplicate_errors(plan: Plan, config: JobConfig, kind: str) -> None:
    """One error row per duplicated id not already written by an earlier run."""
    new = pa.array(plan.duplicates, plan.id_type)
    if plan.done is not None:
        new = new.filter(pc.invert(pc.is_in(new, value_set=plan.done)))
    rows = [empty_row(i, task=config.generation.task, media_kind=kind,
                      error=f"input: id {i!r} appears more than once in the input; ids must be unique")
            for i in new.to_pylist()]
    if rows:
        filesystem, path = _filesystem(plan.output_uri)
        filesystem.create_dir(path, recursive=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=output_schema(plan.id_type)),
                       f"{path}/duplicates-{time.strftime('%Y%m%d%H%M%S')}.parquet", filesystem=filesystem)


@dataclass
class ActorSizes:
    gpu_actors: int
    cpu_actors: int
    actor_cpus: float  # CPUs each actor reserves
    use_gpu: bool


def actor_sizes(config: JobConfig, rows_to_do: int, gpus: int, cpus: int) -> ActorSizes:
    """How many engine and preprocess actors, from the config and what the cluster has now."""
    use_gpu = gpus > 0 if config.resources.use_gpu is None else config.resources.use_gpu
    # a small job gets no idle actors: each costs a process start and, on GPUs, a model load
    todo = max(1, rows_to_do)
    per_gpu = 1 / config.resources.gpus_per_actor if use_gpu else 1
    gpu_actors = min(config.resources.gpu_actors or max(int(gpus * per_gpu + 1e-9), 1),
                     math.ceil(todo / config.resources.batch_size))
    wanted_cpu_actors = min(config.resources.cpu_actors, math.ceil(todo / PREPROCESS_BATCH))
    # Actors hold their CPUs for the whole run; read and write tasks need one more, or the
    # pipeline waits forever on a small machine. So actors get a fraction when CPUs are few,
    # unless the config says GPUs come later (an autoscaling cluster: it grows to the request).
    if config.resources.use_gpu is not None or cpus - 1 >= wanted_cpu_actors + gpu_actors:
        return ActorSizes(gpu_actors, wanted_cpu_actors, 1.0, use_gpu)
    cpu_actors = max(1, min(wanted_cpu_actors, cpus - gpu_actors - 1))
    actor_cpus = min(1.0, (cpus - 1) / (cpu_actors + gpu_actors)) if cpus > 1 else 0.5
    return ActorSizes(gpu_actors, cpu_actors, actor_cpus, use_gpu)


def run_job(config: JobConfig, kind: str) -> Plan:
    """Run the job to completion; returns its plan (the caller summarises the output)."""
    import os

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .faults import INJECT_ENV, FaultLedger
    from .predict import Predictor
    from .preprocess import Preprocessor

    plan = plan_job(config, kind)
    cluster.connect()
    id_column = config.input.id_column
    dataset = ray.data.read_parquet(plan.input_uri)
    if config.input.limit:
        dataset = dataset.limit(config.input.limit)
    write_duplicate_errors(plan, config, kind)
    skip = ray.put(plan.to_skip)

    def not_skipped(batch: pa.Table) -> pa.Table:
        ids = batch.column(id_column)
        return batch.filter(pc.invert(pc.is_in(ids, value_set=ray.get(skip).cast(ids.type))))

    resources = ray.cluster_resources()
    sizes = actor_sizes(config, plan.n_input - plan.n_done, int(resources.get("GPU", 0)),
                        int(resources.get("CPU", 1)))
    model_name = EMBEDDED_NAMES.get(plan.model_path, plan.model_path)
    # device faults per id, across GPU actor restarts; on the driver's node, which the job cannot outlive
    # (placed anywhere, a lost worker node could take the ledger and with it every later batch)
    ledger = ray.remote(FaultLedger).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote()
    in_flight = config.resources.batches_in_flight
    gpu_env = {"env_vars": {INJECT_ENV: os.environ[INJECT_ENV]}} if os.environ.get(INJECT_ENV) else None
    # Blocks of one Ray batch: rows stream through both stages and each written file is one
    # batch, so a killed run loses at most the batches in flight.
    dataset = (dataset.map_batches(not_skipped, batch_format="pyarrow")
               .repartition(target_num_rows_per_block=config.resources.batch_size)
               .map_batches(Preprocessor, fn_constructor_args=(plan.model_path, kind, config.input, config.media,
                                                               config.generation),
                            batch_size=PREPROCESS_BATCH, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=sizes.cpu_actors), num_cpus=sizes.actor_cpus)
               .map_batches(Predictor, fn_constructor_args=(plan.model_path, model_name, config.model, config.sparsity,
                                                            config.generation, config.resources, ledger),
                            batch_size=config.resources.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                            compute=ray.data.ActorPoolStrategy(size=sizes.gpu_actors,
                                                               max_tasks_in_flight_per_actor=in_flight),
                            max_concurrency=in_flight, num_gpus=config.resources.gpus_per_actor if sizes.use_gpu else 0,
                            num_cpus=sizes.actor_cpus, **({"runtime_env": gpu_env} if gpu_env else {})))
    try:
        dataset.write_parquet(plan.output_uri)
    finally:
        ray.kill(ledger)  # one per job: a long-lived Ray session must not collect them
    return plan
