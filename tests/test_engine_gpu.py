"""The engine on CUDA (bf16, real kernels, CUDA graphs) against eager decoding and `generate`."""

from __future__ import annotations

import pytest
import torch

from helpers import mixed_samples
from sparsevlm import EngineConfig, SamplingParams, VLMEngine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def gpu_engine(request, tiny_checkpoints):
    return VLMEngine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.bfloat16, device="cuda")


def test_cuda_graphs_equal_eager(gpu_engine):
    samples = mixed_samples(gpu_engine.processor)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 9, 7, 12, 3, 1, 8, 6)]
    eager = VLMEngine(gpu_engine.model, gpu_engine.processor, engine_config=EngineConfig(cuda_graphs=False))
    with_graphs = [r.token_ids for r in gpu_engine.generate(samples, params)]
    assert with_graphs == [r.token_ids for r in eager.generate(samples, params)]


def test_first_token_equals_generate(gpu_engine):
    samples = mixed_samples(gpu_engine.processor, seed=5)
    results = gpu_engine.generate(samples, SamplingParams(max_new_tokens=4))
    for sample, result in zip(samples, results):
        out = gpu_engine.model.generate(**{k: v.cuda() for k, v in sample.items()}, max_new_tokens=4, do_sample=False)
        assert result.token_ids[0] == out[0, sample["input_ids"].shape[1]].item()
