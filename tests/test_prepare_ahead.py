"""`generate` preparing samples on a worker thread while earlier packs run (EngineConfig.prepare_ahead,
the CUDA default) against preparing them all first (the CPU default), CPU fp32: the same packs, the
same answers, and a bad sample raising once what was queued before it is done, the engine left idle."""

from __future__ import annotations

import time

import pytest

from helpers import mixed_samples
from sparsevlm import EngineConfig, SamplingParams, VLMEngine


def engine_with(engine: VLMEngine, samples: list[dict], ahead: bool) -> VLMEngine:
    """An engine whose prefill packs hold about three of these samples, so a call runs several packs."""
    longest = max(engine.prepare(s, i).num_tokens for i, s in enumerate(samples) if "input_ids" in s)
    config = EngineConfig(max_prefill_tokens=3 * longest, prepare_ahead=ahead)
    return VLMEngine(engine.model, engine.processor, engine_config=config)


def recorded(engine: VLMEngine, prepare_delay_s: float = 0.0) -> tuple[list[list[int]], list[int]]:
    """Wraps the engine's prefill (records each pack's sample indices) and, with a delay, its
    prepare (a slow host: the worker falls behind the engine's thread). Returns both lists."""
    packs, prepared = [], []
    prefill, prepare = engine.runner.prefill, engine.prepare

    def recording_prefill(pack):
        packs.append([seq.sample.index for seq in pack])
        return prefill(pack)

    def slow_prepare(sample, index):
        time.sleep(prepare_delay_s)
        prepared.append(index)
        return prepare(sample, index)
    engine.runner.prefill = recording_prefill
    engine.prepare = slow_prepare
    return packs, prepared


def test_the_cpu_prepares_every_sample_first_unless_asked(engine):
    assert not VLMEngine(engine.model, engine.processor).prepare_ahead
    assert VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(prepare_ahead=True)).prepare_ahead


def test_prepared_ahead_the_packs_and_answers_are_the_same(engine):
    samples = mixed_samples(engine.processor, seed=1) + mixed_samples(engine.processor, seed=2)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (4, 7, 2, 5) * 4]
    first = engine_with(engine, samples, ahead=False)
    first_packs, _ = recorded(first)
    reference = [r.token_ids for r in first.generate(samples, params)]
    ahead = engine_with(engine, samples, ahead=True)
    packs, prepared = recorded(ahead, prepare_delay_s=0.02)  # the engine's thread outruns the worker
    assert [r.token_ids for r in ahead.generate(samples, params)] == reference
    assert len(first_packs) > 2 and packs == first_packs  # waited for each pack to fill, never ran one short
    assert prepared == list(range(len(samples)))  # in order, each once
    assert not ahead.has_unfinished() and ahead.runner.pool.num_free == ahead.runner.pool.capacity


@pytest.mark.parametrize("ahead", [False, True])
def test_a_bad_sample_raises_after_what_was_queued_before_it(engine, ahead):
    samples = mixed_samples(engine.processor, seed=1) + mixed_samples(engine.processor, seed=2)
    bad = 10
    samples[bad] = {key: value for key, value in samples[bad].items() if key != "input_ids"}
    runner = engine_with(engine, samples, ahead=ahead)
    packs, prepared = recorded(runner)
    with pytest.raises(ValueError, match=f"sample {bad} has no input_ids"):
        runner.generate(samples, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert prepared == list(range(bad + 1))  # nothing after it is prepared
    ran = sorted(index for pack in packs for index in pack)
    if ahead:
        assert ran == list(range(bad))  # what was queued before it ran to its end
    else:
        assert ran == []  # checked before anything ran
    assert not runner.has_unfinished() and runner.runner.pool.num_free == runner.runner.pool.capacity
    good = [r.token_ids for r in runner.generate(samples[:2], SamplingParams(max_new_tokens=3, ignore_eos=True))]
    assert [len(tokens) for tokens in good] == [3, 3]  # the engine is idle and usable again


def test_the_throughput_benchmark_runs_prepared_first_then_ahead_on_one_engine(tmp_path, monkeypatch):
    """`benchmarks.throughput --prepare-ahead both`: rows with every sample prepared first (method
    ending in @prepared-first), then prepared ahead, each against its own configuration's dense row."""
    from helpers import throughput_report

    report = throughput_report(tmp_path, monkeypatch, "--prepare-ahead", "both")
    rows = report["rows"]
    assert report["prepare_ahead"] == "both"
    assert [(r["method"], r["prepare_ahead"]) for r in rows] == [
        ("none@prepared-first", False), ("none", True), ("sparsevlm-128@prepared-first", False),
        ("sparsevlm-128", True)]
    assert rows[3]["speedup_vs_engine_dense"] == pytest.approx(rows[3]["samples_per_s"] / rows[1]["samples_per_s"])
    assert rows[2]["speedup_vs_engine_dense"] == pytest.approx(rows[2]["samples_per_s"] / rows[0]["samples_per_s"])
