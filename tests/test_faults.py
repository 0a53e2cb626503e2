"""Faults, injected on CPU: out-of-memory splits and retries; a device fault restarts the actor.

Engine level: the model runner is wrapped to raise as CUDA would. Job level (Ray, tiny model):
a GPU actor fails as a device fault does; Ray restarts it and its rows run again, and a row
that fails twice gets an error row; every id appears exactly once either way.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from helpers import mixed_samples
from sparsevlm import EngineConfig, SamplingParams, VLMEngine
from sparsevlm.engine import DeviceFault, is_device_fault

PARAMS = [SamplingParams(max_new_tokens=n) for n in (5, 9, 7, 12, 3, 1, 8, 6)]


@pytest.fixture(scope="module")
def dense(engine):
    samples = mixed_samples(engine.processor)
    return samples, [r.token_ids for r in engine.generate(samples, PARAMS)]


def _failing(run, times: int, error, when=lambda sequences: True):
    """`run`, raising `error` the first `times` calls that `when` accepts."""
    calls = {"failed": 0}

    def wrapped(sequences, *args):
        if calls["failed"] < times and when(sequences):
            calls["failed"] += 1
            raise error
        return run(sequences, *args)
    wrapped.calls = calls
    return wrapped


def test_out_of_memory_in_prefill_splits_the_pack_and_answers_stay_exact(engine, dense):
    samples, reference = dense
    split = VLMEngine(engine.model, engine.processor)
    split.runner.prefill = _failing(split.runner.prefill, 3, torch.OutOfMemoryError("CUDA out of memory (injected)"),
                                    when=lambda pack: len(pack) > 1)
    assert [r.token_ids for r in split.generate(samples, PARAMS)] == reference
    assert split.runner.prefill.calls["failed"] == 3
    assert split.runner.pool.num_free == split.runner.pool.capacity  # every block given back


def test_out_of_memory_in_decode_restarts_half_the_batch_and_answers_stay_exact(engine, dense):
    samples, reference = dense
    split = VLMEngine(engine.model, engine.processor)
    split.runner.decode = _failing(split.runner.decode, 2, torch.OutOfMemoryError("CUDA out of memory (injected)"),
                                   when=lambda batch: len(batch) > 2)
    assert [r.token_ids for r in split.generate(samples, PARAMS)] == reference


def test_a_sample_out_of_memory_alone_fails_alone(engine, dense):
    samples, reference = dense
    lonely = VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(max_num_seqs=8))
    huge = samples[1]  # the two-image sample
    lonely.runner.prefill = _failing(lonely.runner.prefill, 10**6, torch.OutOfMemoryError("CUDA out of memory"),
                                     when=lambda pack: any(s.sample.num_tokens == huge["input_ids"].shape[1]
                                                           for s in pack))
    ids = {lonely.add_request(s, p): i for i, (s, p) in enumerate(zip(samples, PARAMS))}
    results = {}
    while lonely.has_unfinished():
        results.update({ids[rid]: r for rid, r in lonely.step()})
    assert isinstance(results[1].error, torch.OutOfMemoryError) and results[1].token_ids == []
    assert all(results[i].token_ids == reference[i] for i in range(len(samples)) if i != 1)


def test_a_device_fault_stops_the_engine_instead_of_failing_rows(engine, dense):
    samples, _ = dense
    broken = VLMEngine(engine.model, engine.processor)
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    broken.runner.decode = _failing(broken.runner.decode, 1, fault)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        broken.generate(samples, PARAMS)
    with pytest.raises(DeviceFault, match="cannot run"):
        broken.step()
    assert is_device_fault(fault) and not is_device_fault(ValueError("bad sample"))
    assert not is_device_fault(torch.OutOfMemoryError("CUDA error: out of memory"))


@pytest.mark.slow
@pytest.mark.parametrize("times,recovers", [(1, True), (2, False)], ids=["once", "twice"])
def test_a_device_fault_restarts_the_actor_and_loses_no_row(tmp_path, monkeypatch, times, recovers):
    from pipeline.cli import main
    from pipeline.faults import INJECT_ENV

    photos = pq.read_table("jobs/sample_data/images.parquet").column("image").to_pylist()
    ids = [f"p{i}" for i in range(8)]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "image": [photos[i % len(photos)] for i in range(8)]}), source)
    monkeypatch.setenv(INJECT_ENV, f"p5:{times}:{tmp_path / 'marks'}")
    out = tmp_path / "out"
    code = main("image", "test", base={"generation": {"task": "caption"}},
                argv=["--input", str(source), "--output", str(out), "--model", "embedded:tiny-qwen2_5_vl",
                      "--max-new-tokens", "3", "--batch-size", "2"])
    assert code == 0
    rows = {row["id"]: row for row in pads.dataset(str(out), format="parquet").to_table().to_pylist()}
    assert sorted(rows) == ids  # every id exactly once (a dict would hide duplicates: count them too)
    assert len(pads.dataset(str(out), format="parquet").to_table()) == len(ids)
    assert len(list((tmp_path / "marks").iterdir())) == times  # the fault really happened
    if recovers:
        assert all(row["error"] is None and row["output"] is not None for row in rows.values())
    else:
        failed = {i for i, row in rows.items() if row["error"]}
        assert failed == {"p5"}  # its neighbours in the engine were suspects too, then ran alone, fine
        assert "device fault on 2 attempts" in rows["p5"]["error"] and rows["p5"]["output"] is None
        assert all(rows[i]["output"] is not None for i in ids if i != "p5")
