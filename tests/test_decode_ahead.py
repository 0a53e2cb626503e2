"""Decode steps queued one ahead (sparsevlm/decoding.py) against one step at a time (CPU, fp32:
the default there is one at a time, so these ask for it).

The queued step must serve the next call when the batch only shrank, be dropped when newcomers
joined, and change no answer either way: stop tokens, seeded sampling and newcomers included.
"""

from __future__ import annotations

import pytest
import torch

from helpers import mixed_requests, mixed_samples, streamed
from sparsevlm import EngineConfig, SamplingParams, VLMEngine
from sparsevlm.decoding import DecodeStep

AHEAD = EngineConfig(decode_ahead=True)  # on the CPU it is off unless asked for


def counted_launches(engine: VLMEngine) -> dict:
    """Wraps the engine's decoder to count fresh and queued-ahead launches."""
    counts = {"fresh": 0, "ahead": 0}
    launch = engine.runner.decoder._launch

    def counting(rows, committed, previous):
        counts["fresh" if previous is None else "ahead"] += 1
        return launch(rows, committed, previous)
    engine.runner.decoder._launch = counting
    return counts


def test_the_cpu_decodes_one_step_at_a_time_unless_asked(engine):
    assert not VLMEngine(engine.model, engine.processor).runner.decoder.ahead
    assert VLMEngine(engine.model, engine.processor, engine_config=AHEAD).runner.decoder.ahead


def test_a_batch_that_only_shrinks_runs_each_step_once(engine):
    samples = mixed_samples(engine.processor)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 9, 7, 12, 3, 1, 8, 6)]
    ahead = VLMEngine(engine.model, engine.processor, engine_config=AHEAD)
    counts = counted_launches(ahead)
    results = ahead.generate(samples, params)
    assert [len(r.token_ids) for r in results] == [p.max_new_tokens for p in params]
    # one prefill pack, then 11 decode steps (the longest answer's 12 tokens): the first launched
    # from the host's tokens, every later one queued ahead from the device's, none thrown away
    assert counts == {"fresh": 1, "ahead": 10}
    assert ahead.runner.pool.num_free == ahead.runner.pool.capacity


@pytest.fixture(scope="module")
def streamed_plain(engine):
    samples, params = mixed_requests(engine, seed=3)
    plain = VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(decode_ahead=False))
    return samples, params, streamed(plain, samples, params)


def test_queued_steps_change_no_answer(engine, streamed_plain, monkeypatch):
    samples, params, reference = streamed_plain
    assert any(len(t) < p.max_new_tokens for t, p in zip(reference, params))  # some stopped early
    ahead = VLMEngine(engine.model, engine.processor, engine_config=AHEAD)
    counts = counted_launches(ahead)
    dropped = []
    drop = DecodeStep.drop
    monkeypatch.setattr(DecodeStep, "drop", lambda step: (dropped.append(step), drop(step))[1])
    assert streamed(ahead, samples, params) == reference
    assert dropped and counts["ahead"] > counts["fresh"]  # newcomers dropped a queued step; most served
    assert ahead.runner.pool.num_free == ahead.runner.pool.capacity


def test_a_dropped_step_sets_sampling_generators_back(engine, streamed_plain):
    """Sampled rows of a dropped step drew from their generators: a re-run must draw the same."""
    samples, params, reference = streamed_plain
    ahead = VLMEngine(engine.model, engine.processor, engine_config=AHEAD)
    first = streamed(ahead, samples, params)
    assert first == reference
    assert streamed(ahead, samples, params) == reference  # again, after a step left queued at the end


def test_an_out_of_memory_retry_drops_the_queued_step(engine):
    """Decode runs out of memory with a step queued: half the batch starts over (prefilled again,
    the same sequences with fewer tokens), so the queued step serves nobody and is dropped."""
    samples = mixed_samples(engine.processor, seed=4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    plain = VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(decode_ahead=False))
    reference = [r.token_ids for r in plain.generate(samples, params)]
    ahead = VLMEngine(engine.model, engine.processor, engine_config=AHEAD)
    decode, calls = ahead.runner.decode, []

    def failing_third_call(batch, *args):
        calls.append(len(batch))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return decode(batch, *args)
    ahead.runner.decode = failing_third_call
    assert [r.token_ids for r in ahead.generate(samples, params)] == reference
    assert len(calls) > 8  # the retried half decoded again


def test_no_step_is_queued_when_the_scheduler_will_admit_newcomers(engine, monkeypatch):
    """Four seats for eight requests that end by length: seats free up at steps the scheduler
    can foresee, so no queued step is ever thrown away, and answers are one step at a time's."""
    samples = mixed_samples(engine.processor, seed=5)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 3, 8, 2, 5, 7, 4, 6)]
    config = dict(max_num_seqs=4)
    plain = VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(decode_ahead=False, **config))
    reference = [r.token_ids for r in plain.generate(samples, params)]
    ahead = VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(decode_ahead=True, **config))
    counts = counted_launches(ahead)
    dropped = []
    drop = DecodeStep.drop
    monkeypatch.setattr(DecodeStep, "drop", lambda step: (dropped.append(step), drop(step))[1])
    assert [r.token_ids for r in ahead.generate(samples, params)] == reference
    assert not dropped and counts["ahead"] > 0
