"""Compiled decoder layers for decode steps (EngineConfig.compile_decode) against the layers as loaded.

On CPU the layers compile with the `aot_eager` backend: dynamo traces them and AOTAutograd
builds their graphs exactly as on the GPU, while the arithmetic stays torch's own, so the
tokens must equal `model.generate` exactly (fp32). The GPU test in test_engine_gpu.py runs
inductor's kernels.
"""

from __future__ import annotations

import pytest
import torch

from helpers import mixed_samples
from sparsevlm import EngineConfig, SamplingParams, VLMEngine
from sparsevlm.model_runner import compiled_decode_layers

from test_engine_matches_generate import reference_tokens

MAX_NEW = [6, 3, 9, 4, 1, 7, 5, 8]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "llava"])
def engine(request, tiny_checkpoints):
    return VLMEngine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.float32, device="cpu",
                                     engine_config=EngineConfig(max_num_seqs=3))


def test_compiled_decode_equals_generate(engine):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    samples = mixed_samples(engine.processor, seed=3)
    params = [SamplingParams(max_new_tokens=n) for n in MAX_NEW]
    references = [reference_tokens(engine, s, p.max_new_tokens) for s, p in zip(samples, params)]
    runner = engine.runner
    runner.decode_layers = compiled_decode_layers(runner.adapter.layers, backend="aot_eager")
    try:
        results = engine.generate(samples, params)
    finally:
        runner.decode_layers = list(runner.adapter.layers)
    assert [r.token_ids for r in results] == references
    # every layer and batch size (1..3 seats) share the compiled graphs: their number does not grow
    # with depth (the tiny decoders have 4 layers; a recompile per layer would give >= 4 per piece)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 12, graphs
