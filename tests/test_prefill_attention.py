"""Packed prefill backends against causal attention computed sample by sample with a dense mask."""

from __future__ import annotations

import pytest
import torch

from sparsevlm.attention import AttentionBackend, PrefillMeta, prefill_attention_reference


def naive_causal(q, k, v, cu_seqlens, scale):
    """Softmax over the full (T, T) matrix with a block-diagonal causal mask: the plainest definition."""
    total, groups = q.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    segment = torch.zeros(total, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        segment[a:b] = i
    idx = torch.arange(total)
    allowed = (segment[:, None] == segment[None, :]) & (idx[None, :] <= idx[:, None])
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    probs = scores.masked_fill(~allowed.to(q.device), float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float())


def packed_case(lengths, num_q_heads, num_kv_heads, head_dim, dtype, device):
    generator = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    make = lambda h: torch.randn(total, h, head_dim, generator=generator).to(device=device, dtype=dtype)  # noqa: E731
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    meta = PrefillMeta(cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device), cu_seqlens_list=cu,
                       max_seqlen=max(lengths), slot_mapping=torch.arange(total, device=device))
    return make(num_q_heads), make(num_kv_heads), make(num_kv_heads), meta


@pytest.mark.parametrize("lengths", [[1], [5, 1, 33], [64, 7, 100, 2]])
def test_sdpa_reference_equals_naive(lengths):
    q, k, v, meta = packed_case(lengths, 4, 2, 16, torch.float32, "cpu")
    got = prefill_attention_reference(q, k, v, meta.cu_seqlens_list, 0.25)
    torch.testing.assert_close(got, naive_causal(q, k, v, meta.cu_seqlens_list, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[1], [5, 1, 33], [300, 1100, 7, 2048]])
def test_gpu_backend_equals_naive(lengths):
    backend = AttentionBackend.choose(torch.device("cuda"))
    q, k, v, meta = packed_case(lengths, 28, 4, 128, torch.bfloat16, "cuda")
    got = backend.prefill(q, k, v, meta, 128 ** -0.5).float()
    torch.testing.assert_close(got, naive_causal(q, k, v, meta.cu_seqlens_list, 128 ** -0.5), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[1121] * 4, [300] * 7, [1121, 1120]])
def test_gpu_batched_prefill_equals_naive(lengths):
    """EngineConfig.batched_prefill_attention's path (cuDNN, bf16) where lengths are equal, varlen where not."""
    backend = AttentionBackend.choose(torch.device("cuda"), batched_prefill=True)
    q, k, v, meta = packed_case(lengths, 28, 4, 128, torch.bfloat16, "cuda")
    got = backend.prefill(q, k, v, meta, 128 ** -0.5).float()
    torch.testing.assert_close(got, naive_causal(q, k, v, meta.cu_seqlens_list, 128 ** -0.5), atol=2e-2, rtol=2e-2)


def test_vision_tower_runs_varlen_not_a_window_loop(engine, monkeypatch):
    """transformers loops over vision windows in Python unless its attention is varlen: ours must be."""
    from helpers import mixed_samples

    calls = []
    original = AttentionBackend.varlen
    monkeypatch.setattr(AttentionBackend, "varlen",
                        lambda self, *a, **kw: calls.append(kw["causal"]) or original(self, *a, **kw))
    engine.generate(mixed_samples(engine.processor)[:2])
    depth = engine.model.config.vision_config.depth
    assert calls.count(False) == depth  # one bidirectional varlen call per vision block for the whole pack


def test_the_prefill_attention_benchmark_checks_every_backend_against_the_reference(tmp_path, monkeypatch):
    """`benchmarks.prefill_attention` on CPU: each backend torch runs here agrees with the per-sample
    reference (fp32, 1e-4); those it cannot run are reported, not dropped."""
    import json
    import sys

    from benchmarks import prefill_attention

    out = tmp_path / "attention.json"
    monkeypatch.setattr(sys, "argv", ["prefill_attention", "--samples", "3", "--length", "17", "--repeats", "1",
                                      "--json", str(out)])
    prefill_attention.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == list(prefill_attention.SDPA_BACKENDS)
    timed = [r for r in rows if "error" not in r]
    assert timed and all(r["max_abs_diff"] < 1e-4 and r["ms"] > 0 for r in timed)


@pytest.mark.parametrize("lengths, batched", [([13, 13, 13], True), ([13, 12, 13], False), ([40], False)])
def test_batched_prefill_runs_equal_length_packs_as_one_call(lengths, batched, monkeypatch):
    """`batched_prefill` (CUDA only; forced here on CPU, fp32): a pack of samples of one length goes
    through the batched causal GQA op, any other pack through the varlen path; both equal the naive
    block-diagonal causal attention (1e-5)."""
    backend = AttentionBackend("sdpa", torch.device("cpu"))
    assert not AttentionBackend("sdpa", torch.device("cpu"), batched_prefill=True).batched_prefill
    backend.batched_prefill = True
    calls = []
    op = torch.ops.sparsevlm.equal_segments_attention
    monkeypatch.setattr(torch.ops.sparsevlm, "equal_segments_attention",
                        lambda *args: calls.append(args[3:]) or op(*args))
    q, k, v, meta = packed_case(lengths, 6, 2, 16, torch.float32, "cpu")
    got = backend.prefill(q, k, v, meta, 0.3)
    torch.testing.assert_close(got, naive_causal(q, k, v, meta.cu_seqlens_list, 0.3), atol=1e-5, rtol=1e-5)
    assert calls == ([(lengths[0], 0.3, True)] if batched else [])


def test_the_engine_with_batched_prefill_equals_generate(engine):
    """Same-size images under one prompt (equal lengths at every layer, pruned or not): with the
    batched prefill forced on (CPU, fp32) the engine still gives `generate`'s tokens, and pruned,
    the varlen engine's tokens and kept positions."""
    import unittest.mock

    from helpers import same_size_samples
    from sparsevlm import SamplingParams, SparsityConfig, VLMEngine
    from test_engine_matches_generate import reference_tokens

    processor = engine.processor
    samples = same_size_samples(processor, 3, seed=5)
    batched = VLMEngine(engine.model, processor)
    assert batched.config.batched_prefill_attention  # the default, which on the CPU leaves varlen/SDPA in place:
    assert not batched.runner.backend.batched_prefill
    batched.runner.backend.batched_prefill = True
    calls = []
    op = torch.ops.sparsevlm.equal_segments_attention
    with unittest.mock.patch.object(torch.ops.sparsevlm, "equal_segments_attention",
                                    lambda *args: calls.append(args[3:]) or op(*args)):
        results = batched.generate(samples, SamplingParams(max_new_tokens=4))
        assert [r.token_ids for r in results] == [reference_tokens(engine, s, 4) for s in samples]
        causal_calls = [c for c in calls if c[-1] is True]
        assert len(causal_calls) == engine.model.config.get_text_config().num_hidden_layers  # every layer, one call
        sparsity = SparsityConfig(method="sparsevlm", keep_ratio=0.3)
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        pruned = batched.generate(samples, params, sparsity=sparsity)
    plain = VLMEngine(engine.model, processor).generate(samples, params, sparsity=sparsity)
    assert [r.token_ids for r in pruned] == [r.token_ids for r in plain]
    assert [r.stats.kept_visual_positions for r in pruned] == [r.stats.kept_visual_positions for r in plain]
