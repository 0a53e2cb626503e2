"""Compiled decoder layers (EngineConfig.compile_decode / compile_prefill) against the layers as loaded.

On CPU the layers compile with the `aot_eager` backend: dynamo traces them and AOTAutograd
builds their graphs exactly as on the GPU, while the arithmetic stays torch's own, so the
tokens must equal `model.generate` exactly (fp32), and a pruned run must equal the uncompiled
engine's pruned run. The GPU test in test_engine_gpu.py runs inductor's kernels.
"""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import mixed_samples
from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine
from sparsevlm.model_runner import compiled_layers

from test_engine_matches_generate import reference_tokens

MAX_NEW = [6, 3, 9, 4, 1, 7, 5, 8]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "llava"])
def engine(request, tiny_checkpoints):
    return VLMEngine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.float32, device="cpu",
                                     engine_config=EngineConfig(max_num_seqs=3))


def compiled_run(engine, samples, params, sparsity=None):
    """`engine.generate` with compiled layers for prefill and decode (the GPU default: compile_prefill
    and compile_decode), then the layers as loaded again."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runner = engine.runner
    layers = compiled_layers(runner.layers, backend="aot_eager")
    runner.decode_layers = runner.prefill_layers = layers
    try:
        return engine.generate(samples, params, sparsity=sparsity)
    finally:
        runner.decode_layers = runner.prefill_layers = runner.layers


def test_compiled_layers_equal_generate(engine):
    samples = mixed_samples(engine.processor, seed=3)
    params = [SamplingParams(max_new_tokens=n) for n in MAX_NEW]
    references = [reference_tokens(engine, s, p.max_new_tokens) for s, p in zip(samples, params)]
    results = compiled_run(engine, samples, params)
    assert [r.token_ids for r in results] == references
    # every layer, batch size (1..3 seats) and pack shares the compiled graphs: their number does not
    # grow with depth (the tiny decoders have 4 layers; a recompile per layer would give >= 4 per piece)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 16, graphs


def test_compiled_prefill_prunes_as_the_layers_as_loaded(engine):
    """Pruning reads the captured q/k of its layers and regathers the stream between layers."""
    samples = mixed_samples(engine.processor, seed=4)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    sparsity = SparsityConfig(method="sparsevlm", keep_ratio=0.3)
    expected = engine.generate(samples, params, sparsity=sparsity)
    results = compiled_run(engine, samples, params, sparsity=sparsity)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert [r.stats.kept_visual_positions for r in results] == [r.stats.kept_visual_positions for r in expected]
    assert any(r.stats.n_visual_tokens_kept < r.stats.n_visual_tokens for r in results)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_compiled_vision_tower_equals_the_model_s_own(tiny_checkpoints, family):
    """CLIP's and SigLIP's encoder layers compiled: the same tokens as the tower as loaded. (Qwen's
    compiled blocks take minutes to trace on CPU over the mixed sizes; the GPU tests run them.)"""
    engine = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.float32, device="cpu")
    samples = mixed_samples(engine.processor, seed=5)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    expected = [r.token_ids for r in engine.generate(samples, params)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine.adapter.compile_vision(backend="aot_eager")
    assert [r.token_ids for r in engine.generate(samples, params)] == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled blocks ran


def broken_backend(graph_module, example_inputs):
    raise RuntimeError("this backend compiles nothing")


def test_a_tower_that_fails_to_compile_runs_the_model_s_own(tiny_checkpoints, caplog):
    engine = VLMEngine.from_pretrained(tiny_checkpoints["llava"], dtype=torch.float32, device="cpu")
    samples = mixed_samples(engine.processor, seed=5)[:3]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    expected = [r.token_ids for r in engine.generate(samples, params)]
    torch._dynamo.reset()
    engine.adapter.compile_vision(backend=broken_backend)
    assert [r.token_ids for r in engine.generate(samples, params)] == expected
    assert "failed to compile" in caplog.text
    assert not engine.adapter._tower_swaps  # given up for good: later packs do not try again


def test_a_compiler_failure_in_prefill_falls_back_to_the_layers_as_loaded(engine, caplog):
    """The compiled layers fail to compile mid-pack, after a rank-adaptive pruning layer replanned the
    samples: the pack runs again through the layers as loaded, from its original plans, and gives
    what an uncompiled engine gives; later packs stay on the loaded layers."""
    samples = mixed_samples(engine.processor, seed=9)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    adaptive = SparsityConfig(method="sparsevlm", schedule={1: 0.8, 2: 0.5}, rank_adaptive=True, rank_scale=1.0,
                              rank_bias=1.0)
    expected = engine.generate(samples, params, sparsity=adaptive)
    runner, loaded = engine.runner, engine.runner.layers
    torch._dynamo.reset()
    runner.prefill_layers = loaded[:2] + compiled_layers(loaded[2:], backend=broken_backend)  # after layer 1's pruning
    try:
        with caplog.at_level(logging.WARNING, logger="sparsevlm.model_runner"):
            results = engine.generate(samples, params, sparsity=adaptive)
        assert runner.prefill_layers == loaded
    finally:
        runner.prefill_layers = loaded
    assert "failed on a prefill pack" in caplog.text
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert [r.stats.kept_per_pruning_layer for r in results] == [r.stats.kept_per_pruning_layer for r in expected]
    assert [r.stats.kept_visual_positions for r in results] == [r.stats.kept_visual_positions for r in expected]
