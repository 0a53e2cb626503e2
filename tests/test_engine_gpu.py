"""The engine on CUDA (bf16, real kernels, CUDA graphs) against eager decoding and `generate`."""

from __future__ import annotations

import pytest
import torch

from helpers import mixed_requests, mixed_samples, streamed
from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision"])
def gpu_engine(request, tiny_checkpoints):
    return VLMEngine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.bfloat16, device="cuda")


# Graphs against eager steps over the layers as loaded: capture must change nothing. (Compiled layers
# round bf16 differently at each batch size's kernels, so their tokens can part after a few steps;
# test_compiled_decode_step_matches_eager_layers holds them to a tolerance instead.)
UNCOMPILED = dict(compile_decode=False, max_cache_tokens=1 << 15)


def test_cuda_graphs_equal_eager(gpu_engine):
    samples = mixed_samples(gpu_engine.processor)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 9, 7, 12, 3, 1, 8, 6)]
    graphs = VLMEngine(gpu_engine.model, gpu_engine.processor, engine_config=EngineConfig(**UNCOMPILED))
    eager = VLMEngine(gpu_engine.model, gpu_engine.processor,
                      engine_config=EngineConfig(cuda_graphs=False, **UNCOMPILED))
    with_graphs = [r.token_ids for r in graphs.generate(samples, params)]
    assert with_graphs == [r.token_ids for r in eager.generate(samples, params)]


def test_decode_steps_queued_ahead_equal_one_at_a_time(gpu_engine):
    """Through the graphs, the next step's tokens taken from the device: stops, seeded sampling and
    newcomers (a dropped queued step) change nothing."""
    samples, params = mixed_requests(gpu_engine, seed=8)
    ahead = VLMEngine(gpu_engine.model, gpu_engine.processor, engine_config=EngineConfig(**UNCOMPILED))
    assert ahead.runner.decoder.ahead  # the default on CUDA
    plain = VLMEngine(gpu_engine.model, gpu_engine.processor,
                      engine_config=EngineConfig(decode_ahead=False, **UNCOMPILED))
    assert streamed(ahead, samples, params) == streamed(plain, samples, params)
    assert ahead.runner.pool.num_free == ahead.runner.pool.capacity


def test_first_token_equals_generate(gpu_engine):
    samples = mixed_samples(gpu_engine.processor, seed=5)
    results = gpu_engine.generate(samples, SamplingParams(max_new_tokens=4))
    for sample, result in zip(samples, results):
        out = gpu_engine.model.generate(**{k: v.cuda() for k, v in sample.items()}, max_new_tokens=4, do_sample=False)
        assert result.token_ids[0] == out[0, sample["input_ids"].shape[1]].item()


def test_sparse_keep_everything_equals_dense_and_graphs_equal_eager(gpu_engine):
    """bf16 on the GPU: the Triton scoring path, pruned packs and per-layer cache lengths."""
    samples = mixed_samples(gpu_engine.processor, seed=6)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    dense = [r.token_ids for r in gpu_engine.generate(samples, params)]
    keep_all = SparsityConfig(method="sparsevlm", schedule={0: 1.0, 2: 1.0})
    assert [r.token_ids for r in gpu_engine.generate(samples, params, sparsity=keep_all)] == dense
    sparse = SparsityConfig(method="sparsevlm", keep_ratio=0.3)
    graphs = VLMEngine(gpu_engine.model, gpu_engine.processor, engine_config=EngineConfig(**UNCOMPILED))
    eager = VLMEngine(gpu_engine.model, gpu_engine.processor,
                      engine_config=EngineConfig(cuda_graphs=False, **UNCOMPILED))
    with_graphs = graphs.generate(samples, params, sparsity=sparse)
    without = eager.generate(samples, params, sparsity=sparse)
    assert [r.token_ids for r in with_graphs] == [r.token_ids for r in without]
    assert [r.stats.kept_visual_positions for r in with_graphs] == [r.stats.kept_visual_positions for r in without]
    assert any(r.stats.n_visual_tokens_kept < r.stats.n_visual_tokens for r in with_graphs)


def first_decode_step(engine: VLMEngine, samples: list[dict]) -> tuple[torch.Tensor, ...]:
    """Run the samples' prefill pack (everybody gets a first token and a cache); the device inputs
    of the decode step after it, for `runner.decode_logits`."""
    for sample in samples:
        engine.add_request(sample, SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.step()
    runner, batch = engine.runner, list(engine.scheduler.running)
    block = runner.decoder.input_block(tuple(batch), tuple(len(seq.tokens) for seq in batch), True)
    return runner.decode_inputs.views(block.to("cuda"))


def test_compiled_decode_step_matches_eager_layers(gpu_engine):
    """One decode step through inductor-compiled layers against the layers as loaded, on the same
    cache. bf16: fused kernels round intermediates differently, so logits agree to 5% of their
    largest magnitude (tests/test_compiled_layers.py holds compiled layers to `generate` exactly, in fp32 on CPU)."""
    from sparsevlm.model_runner import compiled_layers

    engine = VLMEngine(gpu_engine.model, gpu_engine.processor,
                       engine_config=EngineConfig(cuda_graphs=False, compile_decode=False))
    runner, inputs = engine.runner, first_decode_step(engine, mixed_samples(engine.processor, seed=7))
    batch = list(engine.scheduler.running)
    with torch.inference_mode():
        eager = runner.decode_logits(*inputs).float()
        runner.decode_layers = compiled_layers(runner.layers)
        compiled = runner.decode_logits(*inputs).float()
    assert compiled.shape == eager.shape == (len(batch), eager.shape[1])
    assert (compiled - eager).abs().max() <= 0.05 * eager.abs().max()


def test_fused_qkv_layers_match_the_layers_as_loaded(gpu_engine):
    """EngineConfig.fuse_qkv in bf16: the first tokens are generate's, and one decode step through the
    fused layers against the loaded ones on the same cache agrees to 5% of the largest logit (one GEMM
    over three weights may accumulate in another order than three GEMMs)."""
    engine = VLMEngine(gpu_engine.model, gpu_engine.processor,
                       engine_config=EngineConfig(fuse_qkv=True, cuda_graphs=False, **UNCOMPILED))
    samples = mixed_samples(engine.processor, seed=12)
    for sample, result in zip(samples, engine.generate(samples, SamplingParams(max_new_tokens=1))):
        out = engine.model.generate(**{k: v.cuda() for k, v in sample.items()}, max_new_tokens=1, do_sample=False)
        assert result.token_ids[0] == out[0, sample["input_ids"].shape[1]].item()
    runner, inputs = engine.runner, first_decode_step(engine, samples)
    with torch.inference_mode():
        fused = runner.decode_logits(*inputs).float()
        runner.decode_layers = list(runner.adapter.layers)
        loaded = runner.decode_logits(*inputs).float()
    assert (fused - loaded).abs().max() <= 0.05 * loaded.abs().max()


def test_compiled_prefill_matches_eager_layers(gpu_engine, monkeypatch):
    """A prefill pack through inductor-compiled layers (compile_prefill, the default) against the layers
    as loaded, on the same samples. bf16: first-token logits agree to 5% of their largest magnitude
    (fused kernels round differently; fp32 on CPU is exact, tests/test_compiled_layers.py). Pruned,
    the rater scores round differently too, so a few near-tied tokens may swap: the same number of
    visual tokens stays, and at least 90% of the kept positions are the same."""
    import sparsevlm.model_runner as model_runner

    first_logits = []
    select = model_runner.select_tokens
    monkeypatch.setattr(model_runner, "select_tokens",
                        lambda logits, *args: first_logits.append(logits.float()) or select(logits, *args))
    samples = mixed_samples(gpu_engine.processor, seed=8)
    params = SamplingParams(max_new_tokens=1)

    def run(compile_prefill, sparsity=None):
        first_logits.clear()
        engine = VLMEngine(gpu_engine.model, gpu_engine.processor, engine_config=EngineConfig(
            cuda_graphs=False, compile_decode=False, compile_prefill=compile_prefill))
        runner = engine.runner
        assert (runner.prefill_layers[0] is not runner.layers[0]) == compile_prefill  # the switch took
        results = engine.generate(samples, params, sparsity=sparsity)
        return torch.cat(first_logits), results

    eager, _ = run(False)
    compiled, _ = run(True)
    assert compiled.shape == eager.shape == (len(samples), eager.shape[1])
    assert (compiled - eager).abs().max() <= 0.05 * eager.abs().max()

    sparse = SparsityConfig(method="sparsevlm", keep_ratio=0.3)
    pruned = run(False, sparse)[1]
    assert any(r.stats.n_visual_tokens_kept < r.stats.n_visual_tokens for r in pruned)
    kept_eager = [r.stats.kept_visual_positions for r in pruned]
    kept_compiled = [r.stats.kept_visual_positions for r in run(True, sparse)[1]]
    assert [len(k) for k in kept_compiled] == [len(k) for k in kept_eager]
    shared = sum(len(set(a) & set(b)) for a, b in zip(kept_eager, kept_compiled))
    assert shared >= 0.9 * sum(len(k) for k in kept_eager)


def test_batched_prefill_attention_matches_varlen(gpu_engine, monkeypatch):
    """EngineConfig.batched_prefill_attention in bf16: same-size images under one prompt make a pack of
    equal lengths, which goes through cuDNN's batched attention at every layer; its first-token logits
    agree with the varlen path's to 5% of their largest magnitude (other kernels, other rounding)."""
    import sparsevlm.model_runner as model_runner
    from helpers import same_size_samples

    first_logits, batched_calls = [], []
    select = model_runner.select_tokens
    monkeypatch.setattr(model_runner, "select_tokens",
                        lambda logits, *args: first_logits.append(logits.float()) or select(logits, *args))
    op = torch.ops.sparsevlm.equal_segments_attention
    monkeypatch.setattr(torch.ops.sparsevlm, "equal_segments_attention",
                        lambda *args: batched_calls.append(args[3:]) or op(*args))
    processor = gpu_engine.processor
    samples = same_size_samples(processor, 4, seed=13)

    def run(batched):
        first_logits.clear()
        engine = VLMEngine(gpu_engine.model, processor, engine_config=EngineConfig(
            batched_prefill_attention=batched, cuda_graphs=False, compile_prefill=False, **UNCOMPILED))
        engine.generate(samples, SamplingParams(max_new_tokens=1))
        return torch.cat(first_logits)

    varlen = run(False)
    assert not [c for c in batched_calls if c[-1] is True]
    batched = run(True)
    assert len([c for c in batched_calls if c[-1] is True]) == gpu_engine.model.config.get_text_config().num_hidden_layers
    assert batched.shape == varlen.shape == (len(samples), varlen.shape[1])
    assert (batched - varlen).abs().max() <= 0.05 * varlen.abs().max()
