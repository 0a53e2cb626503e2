"""The image job on a Ray cluster of several nodes, simulated on this machine (CPU, tiny model).

Ray's own test cluster (`ray.cluster_utils.Cluster`) starts a head node (the driver's, no GPU)
and worker nodes with CPUs of their own and one fake GPU each: the job places one engine per
GPU, so one per worker node (the engines run on the CPU; the GPU is only a resource to Ray).
Three runs: every node does work; a worker node removed while its batches are in flight, and
the job still writes every id exactly once, the lost rows redone on the other nodes; the
driver killed midway, then a rerun onto the same output resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.model_source import TINY_MODEL
from pipeline.run import done_ids

REPO = Path(__file__).resolve().parent.parent
GPU_NODES = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # an earlier module's local Ray would take the driver's connection
    with pytest.MonkeyPatch.context() as env:
        env.delenv("RAY_ADDRESS", raising=False)
        env.delenv("TRITON_INTERPRET", raising=False)  # conftest's, for kernel tests: engines run plain torch
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(GPU_NODES):
            add_gpu_node(nodes)
        ray.init(address=nodes.address)
        try:
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()


def add_gpu_node(nodes) -> None:
    nodes.add_node(num_cpus=2, num_gpus=1)
    nodes.wait_for_nodes()


def gpu_node_ids() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def node_of(worker: str) -> str:
    return worker.rsplit(":", 1)[1]  # worker = host:pid:node id


def write_input(path: Path, rows: int) -> list[str]:
    photos = pq.read_table(REPO / "jobs" / "sample_data" / "images.parquet").column("image").to_pylist()
    ids = [f"row-{i:03d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "image": [photos[i % len(photos)] for i in range(rows)]}), path)
    return ids


def job_args(source: Path, out: Path, new_tokens: int = 4) -> list[str]:
    return ["--input", str(source), "--output", str(out), "--model", TINY_MODEL, "--task", "caption",
            "--max-new-tokens", str(new_tokens), "--batch-size", "8"]


def start_job(cluster, source: Path, out: Path, new_tokens: int = 4) -> subprocess.Popen:
    """The image job as its own driver process on the cluster, as `ray job submit` runs it (a driver
    in this process would carry Ray Data state over from other test modules' local clusters)."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "RAY_ADDRESS": cluster.address,
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(out.parent / f"{out.name}-driver.log", "ab") as log:  # the driver keeps its own copy
        return subprocess.Popen([sys.executable, str(REPO / "jobs" / "label_images.py"),
                                 *job_args(source, out, new_tokens)], env=env, start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)


def finished(process: subprocess.Popen, out: Path) -> int:
    code = process.wait(timeout=900)
    if code:
        print((out.parent / f"{out.name}-driver.log").read_text()[-4000:])
    return code


def run_job(cluster, source: Path, out: Path, new_tokens: int = 4) -> int:
    return finished(start_job(cluster, source, out, new_tokens), out)


def read_rows(out: Path) -> pa.Table:
    return pads.dataset(str(out), format="parquet").to_table()


def written_rows(out: Path) -> list[dict]:
    """Rows in the output files complete so far (a file being written is skipped)."""
    rows = []
    for path in sorted(out.glob("*.parquet")) if out.exists() else []:
        try:
            rows += pq.read_table(path, columns=["id", "worker", "finished_at"]).to_pylist()
        except (OSError, pa.ArrowInvalid):
            pass
    return rows


def assert_every_id_once(table: pa.Table, ids: list[str]) -> None:
    got = table.column("id").to_pylist()
    assert len(got) == len(ids) and sorted(got) == sorted(ids)
    assert table.column("error").null_count == len(table), table.column("error").drop_null().to_pylist()[:3]


def test_every_node_labels_rows(cluster, tmp_path):
    ids = write_input(tmp_path / "in.parquet", 240)
    assert run_job(cluster, tmp_path / "in.parquet", tmp_path / "out") == 0
    table = read_rows(tmp_path / "out")
    assert_every_id_once(table, ids)
    assert {node_of(w) for w in table.column("worker").to_pylist()} == gpu_node_ids()


def test_a_node_lost_mid_run_loses_no_row(cluster, tmp_path):
    ids = write_input(tmp_path / "in.parquet", 240)
    out = tmp_path / "out"
    job = start_job(cluster, tmp_path / "in.parquet", out)
    try:
        # remove a node as soon as it has written rows: its engine holds more batches in flight then
        deadline, victim, written = time.time() + 600, None, []
        while victim is None and time.time() < deadline and job.poll() is None:
            written = written_rows(out)
            victim = next((node_of(row["worker"]) for row in written), None)
            time.sleep(0.1)
        assert victim is not None, "no rows written before the job ended"
        assert len(written) < len(ids) // 2, "the node must go while most rows are still to do"
        node = next(n for n in cluster.list_all_nodes() if n.node_id == victim)
        cluster.remove_node(node, allow_graceful=False)
        removed_at = time.time()
        assert finished(job, out) == 0, "the job did not finish after losing a node"
        table = read_rows(out)
        assert_every_id_once(table, ids)
        survivors = gpu_node_ids()
        assert victim not in survivors
        # rows the engines finished after the node went, all on the nodes left (a batch the victim's
        # engine had just finished may still arrive: results go straight to the driver)
        after = [node_of(r["worker"]) for r in table.select(["worker", "finished_at"]).to_pylist()
                 if r["finished_at"] > removed_at + 5]
        assert after and set(after) <= survivors
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        add_gpu_node(cluster)  # the next test gets the cluster it started with


def test_driver_killed_midway_then_rerun_resumes(cluster, tmp_path):
    import ray

    ids = write_input(tmp_path / "in.parquet", 96)
    out = tmp_path / "out"
    # 48 tokens a row (the random-weight model never stops early): the kill lands midway
    process = start_job(cluster, tmp_path / "in.parquet", out, 48)
    deadline = time.time() + 600
    while time.time() < deadline and not written_rows(out):
        assert process.poll() is None, "the job ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # the cluster outlives the driver: wait until Ray has reaped the dead job's workers, so that
    # none of them still writes while the rerun reads what is done
    while time.time() < deadline and not all(job["IsDead"] for job in ray._private.state.jobs() if
                                             job["DriverPid"] == process.pid):
        time.sleep(0.5)
    stable, before = 0, None
    while stable < 6 and time.time() < deadline:
        now = sorted(p.name for p in out.glob("*"))
        stable, before = (stable + 1 if now == before else 0), now
        time.sleep(0.5)
    written = done_ids(str(out))
    first = 0 if written is None else len(written)
    assert 0 < first < len(ids), "kill the job midway: some rows written, not all"
    assert run_job(cluster, tmp_path / "in.parquet", out, 48) == 0
    table = read_rows(out)
    assert_every_id_once(table, ids)
