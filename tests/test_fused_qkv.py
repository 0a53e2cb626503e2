"""The engine's decoder layers (q, k, v as one GEMM: sparsevlm/fused_qkv.py) against the layers as
loaded, for every family, on fresh random inputs; fp32 on CPU, to 1e-5 relative (one GEMM sums each
output over the same K as three do, in a blocking of its own). Called outside an engine, both route
to transformers' SDPA (causal): the attention they hand over is what is compared."""

from __future__ import annotations

import pytest
import torch

from helpers import mixed_samples
from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine
from sparsevlm.fused_qkv import FusedQKVAttention, engine_layers

from test_engine_matches_generate import reference_tokens


@pytest.fixture(scope="module")
def fused_engine(any_engine):
    """A second engine over the same model, with the default `EngineConfig.fuse_qkv` (on)."""
    engine = VLMEngine(any_engine.model, any_engine.processor, engine_config=EngineConfig(max_num_seqs=3))
    assert engine.runner.layers != list(engine.runner.adapter.layers)
    return engine


@pytest.fixture
def random_biases(fused_engine):
    """The tiny checkpoints' projection biases are zero: random ones for a test, the zeros back after.
    Written in place into the loaded projections, which the fused bias views."""
    biases = [getattr(layer.self_attn, name).bias for layer in fused_engine.runner.adapter.layers
              for name in ("q_proj", "k_proj", "v_proj")]
    biases = [b for b in biases if b is not None]
    saved = [b.detach().clone() for b in biases]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in biases:
            b.copy_(torch.randn(b.shape, generator=generator))
    yield
    with torch.no_grad():
        for b, value in zip(biases, saved):
            b.copy_(value)


@pytest.mark.parametrize("tokens", [1, 7])
def test_engine_layers_equal_the_layers_as_loaded(fused_engine, random_biases, tokens):
    runner, adapter = fused_engine.runner, fused_engine.runner.adapter
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(1, tokens, adapter.text_config.hidden_size, generator=generator)
    rotary = adapter.rotary(hidden, adapter.decode_positions(torch.arange(5, 5 + tokens)))
    for fused, loaded in zip(runner.layers, adapter.layers):
        assert isinstance(fused.self_attn, FusedQKVAttention) and fused is not loaded
        assert not isinstance(loaded.self_attn, FusedQKVAttention)  # model.generate keeps transformers' modules
        with torch.inference_mode():
            want = loaded(hidden, attention_mask=None, position_embeddings=rotary)
            got = fused(hidden, attention_mask=None, position_embeddings=rotary)
        want, got = (out[0] if isinstance(out, tuple) else out for out in (want, got))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_fused_weight_is_the_only_copy(fused_engine):
    """The loaded projections read the fused weight; a second engine over the same model reuses it."""
    loaded = fused_engine.runner.adapter.layers[0].self_attn
    fused = fused_engine.runner.layers[0].self_attn
    storage = fused.weight.untyped_storage().data_ptr()
    assert all(getattr(loaded, name).weight.untyped_storage().data_ptr() == storage
               for name in ("q_proj", "k_proj", "v_proj"))
    again = engine_layers(fused_engine.runner.adapter.layers[:1])[0].self_attn
    assert again.weight.untyped_storage().data_ptr() == storage
    assert torch.equal(again.weight, fused.weight)
    q_rows = loaded.q_proj.out_features
    assert torch.equal(fused.weight[:q_rows], loaded.q_proj.weight)


def test_the_fused_engine_equals_generate(fused_engine):
    """Prefill packs and decode steps through the fused layers: `generate`'s tokens; pruned, the
    unfused engine's tokens and kept positions (the raters read the fused layers' q and k)."""
    samples = mixed_samples(fused_engine.processor, seed=11)
    lengths = [5, 2, 7, 3, 1, 6, 4, 8][:len(samples)]
    results = fused_engine.generate(samples, [SamplingParams(max_new_tokens=n) for n in lengths])
    assert [r.token_ids for r in results] == [reference_tokens(fused_engine, s, n) for s, n in zip(samples, lengths)]
    plain = VLMEngine(fused_engine.model, fused_engine.processor,
                      engine_config=EngineConfig(fuse_qkv=False, max_num_seqs=3))
    assert plain.runner.layers == list(plain.runner.adapter.layers)  # off: the layers as loaded
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    sparsity = SparsityConfig(method="sparsevlm", keep_ratio=0.3)
    fused, unfused = (e.generate(samples, params, sparsity=sparsity) for e in (fused_engine, plain))
    assert [r.token_ids for r in fused] == [r.token_ids for r in unfused]
    assert [r.stats.kept_visual_positions for r in fused] == [r.stats.kept_visual_positions for r in unfused]


def test_a_layer_without_q_k_v_projections_stays_as_loaded():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()

    layer = Layer()
    assert engine_layers([layer]) == [layer]
    with pytest.raises(ValueError, match="q/k/v/o"):
        FusedQKVAttention(layer.self_attn)


def test_the_throughput_benchmark_runs_unfused_then_fused_on_the_same_samples(tmp_path, monkeypatch):
    """`benchmarks.throughput --fuse-qkv both`: unfused rows (method ending in @separate-qkv), then
    fused rows (the default) on the same samples, each compared with its own configuration's dense row."""
    from helpers import throughput_report

    rows = throughput_report(tmp_path, monkeypatch, "--fuse-qkv", "both")["rows"]
    assert [(r["method"], r["fuse_qkv"]) for r in rows] == [
        ("none@separate-qkv", False), ("sparsevlm-128@separate-qkv", False), ("none", True), ("sparsevlm-128", True)]
    assert rows[3]["speedup_vs_engine_dense"] == pytest.approx(rows[3]["samples_per_s"] / rows[2]["samples_per_s"])
    assert all(r["n_visual_tokens_kept_mean"] == rows[1]["n_visual_tokens_kept_mean"] for r in rows[1::2])
