"""The rater-score Triton kernel against its plain-torch reference, and the reference against
the plainest possible definition (a per-head loop over full attention matrices)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.rater_scores import RoPEPrior, rater_scores, rater_scores_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_pack(seed: int, lengths: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: str):
    """A packed stream with, per sample, a visual span in the middle and raters after it."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, num_q_heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g).to(device, dtype)
    bounds, texts, weights, visuals = [], [], [], []
    start = 0
    for length in lengths:
        prefix = int(torch.randint(0, 4, (), generator=g))
        n_visual = int(torch.randint(1, length - prefix - 1, (), generator=g))
        visual = torch.arange(start + prefix, start + prefix + n_visual)
        text = torch.arange(start + prefix + n_visual, start + length)
        w = torch.rand(len(text), generator=g)
        w[torch.rand(len(text), generator=g) < 0.4] = 0  # not every text token is a rater
        w[-1] = w[-1] + 0.1
        bounds.append((start, start + length))
        texts.append(text.to(device))
        weights.append((w / w.sum()).to(device))
        visuals.append(visual.to(device))
        start += length
    positions = torch.randint(0, 300, (3, total), generator=g).to(device)
    return q, k, bounds, texts, weights, visuals, positions


def run_kernel(q, k, bounds, texts, weights, visuals, scale, prior=None, **blocks):
    text_offsets, vis_offsets = [0], [0]
    for t, v in zip(texts, visuals):
        text_offsets.append(text_offsets[-1] + len(t))
        vis_offsets.append(vis_offsets[-1] + len(v))
    seq_starts = torch.cat([torch.full((len(t),), s) for t, (s, _) in zip(texts, bounds)]).int().to(q.device)
    return rater_scores(q, k, torch.cat(texts).int(), seq_starts, torch.cat(weights), text_offsets,
                        torch.cat(visuals).int(), vis_offsets, scale, prior=prior, **blocks)


def qwen_like_prior(positions: torch.Tensor, head_dim: int) -> RoPEPrior:
    half = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    sections = torch.tensor([0] * (half // 4) + [1] * (half // 4) + [2] * (half - 2 * (half // 4)))
    return RoPEPrior(positions, inv_freq.to(positions.device), sections.to(positions.device))


def test_reference_is_a_slice_of_full_attention():
    q, k, bounds, texts, weights, visuals, _ = random_pack(0, [40, 17, 64], 6, 2, 16, torch.float64, "cpu")
    scale = 0.3
    got = rater_scores_reference(q, k, bounds, texts, weights, visuals, scale)
    expected = []
    for (start, end), text, w, visual in zip(bounds, texts, weights, visuals):
        per_head = []
        for h in range(q.shape[1]):
            kv = h // 3
            full = torch.zeros(end - start, end - start, dtype=torch.float64)
            for i in range(end - start):  # row i attends to keys 0..i of its own sample
                logits = (k[start:start + i + 1, kv] @ q[start + i, h]) * scale
                full[i, :i + 1] = logits.softmax(0)
            rows = full[text - start][:, visual - start]  # raters x visual
            per_head.append((w[:, None] * rows).sum(0))
        expected.append(torch.stack(per_head, 1))
    torch.testing.assert_close(got, torch.cat(expected).float(), rtol=1e-6, atol=1e-7)


def naive_prior(positions: torch.Tensor, sections: list[int], inv_freq: list[float], a: int, b: int) -> float:
    """W(pos[a] - pos[b]) = 2/sqrt(D) sum_i cos(delta_i theta_i), frequency by frequency, no floor."""
    head_dim = 2 * len(inv_freq)
    total = sum(math.cos((int(positions[sec, a]) - int(positions[sec, b])) * theta)
                for sec, theta in zip(sections, inv_freq))
    return 2 / math.sqrt(head_dim) * total


@pytest.mark.parametrize("rope", ["1d", "mrope"])
def test_v2_scores_match_naive_per_sample(rope):
    """SparseVLM+ (official v2.0): corrected = attention / RoPE prior (no floor); heads ranked per
    sample by corrected rater->visual mass; the top 14/32 of them averaged."""
    from sparsevlm.pruning.scoring import heads_kept, top_heads_mean

    num_heads, head_dim = 9, 8
    q, k, bounds, texts, weights, visuals, positions = random_pack(11, [30, 21, 44], num_heads, 3, head_dim,
                                                                   torch.float64, "cpu")
    prior = qwen_like_prior(positions, head_dim)
    if rope == "1d":
        prior = RoPEPrior(positions[:1].expand(3, -1), prior.inv_freq, torch.zeros_like(prior.sections))
    got = top_heads_mean(rater_scores_reference(q, k, bounds, texts, weights, visuals, 0.4, prior=prior),
                         [len(v) for v in visuals])
    sections, inv_freq = prior.sections.tolist(), prior.inv_freq.tolist()
    chosen = round(14 / 32 * num_heads)
    assert heads_kept(num_heads) == chosen == 4 and heads_kept(32) == 14 and heads_kept(28) == 12
    negative = 0
    for (start, end), text, w, visual, got_sample in zip(bounds, texts, weights, visuals,
                                                        torch.split(got, [len(v) for v in visuals])):
        corrected = torch.zeros(len(visual), num_heads, dtype=torch.float64)
        for h in range(num_heads):
            for r, weight in zip(text.tolist(), w.tolist()):
                probs = ((k[start:r + 1, h // 3] @ q[r, h]) * 0.4).softmax(0)
                for j, v in enumerate(visual.tolist()):
                    wv = naive_prior(positions if rope == "mrope" else positions[:1].expand(3, -1),
                                     sections if rope == "mrope" else [0] * len(sections), inv_freq, r, v)
                    negative += wv < 0
                    corrected[j, h] += weight * probs[v - start] / wv
        mass = corrected.sum(0).tolist()
        top = sorted(range(num_heads), key=lambda h: (-mass[h], h))[:chosen]
        # rtol 1e-3: the library's prior is fp32, and dividing by it near a zero crossing amplifies
        # its rounding (fp64 here)
        torch.testing.assert_close(got_sample, corrected[:, top].mean(1).float(), rtol=1e-3, atol=1e-6)
    assert negative > 0  # the prior does cross zero here, and no floor hid it


@pytest.mark.parametrize("heads", [(4, 2), (7, 1), (8, 8)], ids=["gqa2", "mqa7", "mha"])
@pytest.mark.parametrize("with_prior", [False, True], ids=["plain", "prior"])
def test_kernel_matches_reference_fp32(heads, with_prior):
    """On CPU machines the kernel runs under TRITON_INTERPRET=1 (set by conftest)."""
    q, k, bounds, texts, weights, visuals, positions = random_pack(1, [37, 90, 5, 61], *heads, 16,
                                                                   torch.float32, DEVICE)
    prior = qwen_like_prior(positions, 16) if with_prior else None
    expected = rater_scores_reference(q, k, bounds, texts, weights, visuals, 0.25, prior=prior)
    got = run_kernel(q, k, bounds, texts, weights, visuals, 0.25, prior=prior, block_v=16, block_n=16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_kernel_handles_strided_q_and_empty_samples():
    q, k, bounds, texts, weights, visuals, _ = random_pack(2, [30, 30], 4, 2, 16, torch.float32, DEVICE)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # (T, H, D) view with head-major storage
    visuals[1] = visuals[1][:0]  # a sample with nothing left to score
    expected = rater_scores_reference(q, k, bounds, texts, weights, visuals, 0.25)
    got = run_kernel(q_strided, k, bounds, texts, weights, visuals, 0.25, block_v=16, block_n=16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_prior", [False, True], ids=["plain", "prior"])
def test_kernel_matches_reference_gpu(dtype, with_prior):
    """7B-like shapes: 28 query heads, 4 KV heads, head_dim 128, ~1100-token samples."""
    q, k, bounds, texts, weights, visuals, positions = random_pack(3, [1100, 300, 1069, 700], 28, 4, 128,
                                                                   dtype, "cuda")
    prior = qwen_like_prior(positions, 128) if with_prior else None
    expected = rater_scores_reference(q.float(), k.float(), bounds, texts, weights, visuals, 128 ** -0.5,
                                      prior=prior)
    got = run_kernel(q, k, bounds, texts, weights, visuals, 128 ** -0.5, prior=prior)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}[dtype]
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=tolerance * float(expected.abs().max()))
