"""Each pruning component against naive per-sample code, on fresh random inputs (CPU, fp32/fp64)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsevlm.adapters.base import PreparedSample
from sparsevlm.config import SparsityConfig
from sparsevlm.pruning.pack import MERGED, NOT_VISUAL, PrunedPack
from sparsevlm.pruning.ragged import rank_within_segments
from sparsevlm.pruning.raters import rater_weights
from sparsevlm.pruning.recycling import density_peak_merge
from sparsevlm.pruning.schedule import PruneStep, SamplePlan, plan_sample


def naive_raters(e_v: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """SPARSEVLM.md section 1 for one sample, token by token."""
    n_text = e_t.shape[0]
    share = torch.zeros(n_text, dtype=torch.float64)
    for i in range(e_v.shape[0]):
        logits = torch.tensor([float(e_v[i].double() @ e_t[j].double()) for j in range(n_text)])
        share += logits.softmax(0) / e_v.shape[0]
    raters = [j for j in range(n_text) if share[j] > 1.0 / n_text] or list(range(n_text))
    weights = torch.zeros(n_text)
    weights[raters] = 1.0 / len(raters)
    return weights


def test_raters_match_naive_per_sample():
    g = torch.Generator().manual_seed(0)
    sizes = [(12, 5), (30, 9), (1, 3), (7, 1)]  # (visual, text) per sample
    embeds = torch.randn(sum(v + t for v, t in sizes) + 4, 16, generator=g)
    vis_rows, text_rows, expected, row = [], [], [], 2
    for n_visual, n_text in sizes:
        vis_rows.append(torch.arange(row, row + n_visual))
        text_rows.append(torch.arange(row + n_visual, row + n_visual + n_text))
        expected.append(naive_raters(embeds[vis_rows[-1]], embeds[text_rows[-1]]))
        row += n_visual + n_text
    got = rater_weights(embeds, torch.cat(vis_rows), [v for v, _ in sizes], torch.cat(text_rows),
                        [t for _, t in sizes])
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-6)
    # a sample's raters do not depend on its batch mates
    alone = rater_weights(embeds, vis_rows[1], [sizes[1][0]], text_rows[1], [sizes[1][1]])
    assert torch.equal(alone, got[sizes[0][1]:sizes[0][1] + sizes[1][1]])


def test_top_k_keeps_highest_scores_in_original_order_with_stable_ties():
    g = torch.Generator().manual_seed(1)
    sizes = [20, 1, 33, 8]
    scores = torch.randint(0, 6, (sum(sizes),), generator=g).float()  # many ties
    ranks = rank_within_segments(scores, sizes)
    start = 0
    for size in sizes:
        seg = scores[start:start + size].tolist()
        naive_order = sorted(range(size), key=lambda i: (-seg[i], i))  # best first, earlier wins a tie
        for k in (0, 1, size // 2, size):
            kept = sorted(naive_order[:k])
            got = [i for i in range(size) if ranks[start + i] < k]
            assert got == kept
        start += size


def naive_density_peak(x: torch.Tensor, n_clusters: int):
    """SPARSEVLM.md section 4 for one sample with Python loops."""
    n, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(sorted(v * v for v in dist[i])[:n_clusters]) / n_clusters) for i in range(n)]
    denser = lambda j, i: rho[j] > rho[i] or (rho[j] == rho[i] and j < i)  # noqa: E731
    delta = []
    for i in range(n):
        candidates = [dist[i][j] for j in range(n) if denser(j, i)]
        delta.append(min(candidates) if candidates else max(dist[i]))
    gamma = [rho[i] * delta[i] for i in range(n)]
    centres = sorted(sorted(range(n), key=lambda i: (-gamma[i], i))[:n_clusters])
    assignment = []
    for i in range(n):
        if i in centres:
            assignment.append(centres.index(i))
        else:
            assignment.append(min(range(n_clusters), key=lambda c: (dist[i][centres[c]], c)))
    merged = torch.stack([x[[i for i in range(n) if assignment[i] == c]].mean(0) for c in range(n_clusters)])
    return merged, centres, assignment


def test_density_peak_merge_matches_naive_per_sample():
    g = torch.Generator().manual_seed(2)
    counts = [(17, 2), (5, 1), (40, 4), (9, 9), (1, 1)]  # (tokens, clusters)
    width, dim = max(n for n, _ in counts), 12
    x = torch.zeros(len(counts), width, dim, dtype=torch.float64)
    valid = torch.zeros(len(counts), width, dtype=torch.bool)
    for s, (n, _) in enumerate(counts):
        centres = torch.randn(3, dim, generator=g, dtype=torch.float64) * 3  # clumpy data: real clusters
        x[s, :n] = centres[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, dim, generator=g,
                                                                                 dtype=torch.float64)
        valid[s, :n] = True
    merged, centres, assignment = density_peak_merge(x, valid, [c for _, c in counts])
    for s, (n, c) in enumerate(counts):
        naive_merged, naive_centres, naive_assignment = naive_density_peak(x[s, :n], c)
        assert centres[s, :c].tolist() == naive_centres, f"sample {s}"
        assert assignment[s, :n].tolist() == naive_assignment, f"sample {s}"
        torch.testing.assert_close(merged[s, :c].double(), naive_merged, rtol=1e-5, atol=1e-5)


def test_preset_192_accounts_to_192_equivalent_tokens():
    plan = plan_sample(SparsityConfig(method="sparsevlm", preset=192), num_layers=32, num_visual=576)
    # by hand: keep 300 / 200 / 110 after layers 2 / 6 / 15; recycling floor(0.3 n_del)+1 tokens
    # into floor(n_rec/10)+1 merged: 276 deleted -> 83 -> 9 merged; 109 -> 33 -> 4; 94 -> 29 -> 3
    assert [(s.layer, s.keep, s.n_recycled, s.n_clusters) for s in plan.steps] == [
        (2, 300, 83, 9), (6, 200, 33, 4), (15, 110, 29, 3)]
    retained = [576] * 2 + [309] * 4 + [204] * 9 + [113] * 17  # what each layer passes on
    assert plan.equivalent_visual_tokens == pytest.approx(sum(retained) / 32)
    assert plan.equivalent_visual_tokens == pytest.approx(192, abs=1)
    seen = [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16  # what each layer runs on and caches
    assert list(plan.visual_per_layer) == seen
    for preset in (128, 96, 64):
        plan = plan_sample(SparsityConfig(method="sparsevlm", preset=preset), 32, 576)
        assert plan.equivalent_visual_tokens == pytest.approx(preset, rel=0.02)
    # scaled to another token count and depth, the equivalent scales with the visual tokens
    plan = plan_sample(SparsityConfig(method="sparsevlm", preset=128), 28, 1024)
    assert plan.equivalent_visual_tokens == pytest.approx(128 * 1024 / 576, rel=0.03)
    fastv = plan_sample(SparsityConfig(method="fastv", preset=128), 32, 576)
    assert len(fastv.steps) == 1 and fastv.equivalent_visual_tokens == pytest.approx(128, rel=0.02)


def test_schedules_ratios_and_counts():
    plan = plan_sample(SparsityConfig(method="sparsevlm", schedule={1: 0.5, 3: 10}, recycle=False), 8, 100)
    assert [(s.layer, s.keep) for s in plan.steps] == [(1, 50), (3, 10)]
    assert list(plan.visual_per_layer) == [100, 100, 50, 50, 10, 10, 10, 10]
    plan = plan_sample(SparsityConfig(method="random", keep_ratio=0.25), 32, 400)
    assert [(s.layer, s.keep) for s in plan.steps] == [(2, 100)]
    assert plan_sample(SparsityConfig(method="sparsevlm", preset=64), 32, 0).steps == ()


def make_sample(index: int, prefix: int, n_visual: int, between: int, n_text: int) -> PreparedSample:
    """Rows: prefix text, a visual span split in two by `between` text tokens, then the text region."""
    length = prefix + n_visual + between + n_text
    is_visual = torch.zeros(length, dtype=torch.bool)
    half = n_visual // 2
    is_visual[prefix:prefix + half] = True
    is_visual[prefix + half + between:prefix + n_visual + between] = True
    positions = torch.arange(length).repeat(3, 1) + torch.arange(3)[:, None] * 1000
    return PreparedSample(index=index, input_ids=torch.zeros(length, dtype=torch.long), positions=positions,
                          next_position=length, num_visual_tokens=n_visual, is_visual=is_visual)


def test_pack_prune_matches_naive_per_sample_regather():
    g = torch.Generator().manual_seed(3)
    samples = [make_sample(0, 3, 20, 2, 5), make_sample(1, 0, 0, 0, 7), make_sample(2, 4, 31, 1, 9)]
    steps = [PruneStep(0, 6, 5, 2), None, PruneStep(0, 10, 7, 3)]
    plans = [SamplePlan(s.num_visual_tokens, (step,) if step else (), ()) for s, step in zip(samples, steps)]
    pack = PrunedPack(samples, plans, torch.device("cpu"))
    total = sum(s.num_tokens for s in samples)
    hidden = torch.randn(total, 8, generator=g)
    positions = torch.cat([s.positions for s in samples], dim=1)
    rotary = (torch.randn(1, total, 4, generator=g),)
    vis_rows = pack.visual_rows()
    scores = torch.rand(vis_rows.shape[0], generator=g)
    new_hidden, new_positions, new_rotary = pack.prune(0, scores, vis_rows, hidden, positions, rotary)

    expected_hidden, expected_positions, expected_ids, start, vis_start = [], [], [], 0, 0
    for sample, step in zip(samples, steps):
        rows = list(range(start, start + sample.num_tokens))
        visual = [r for r, v in zip(rows, sample.is_visual.tolist()) if v]
        seg_scores = scores[vis_start:vis_start + len(visual)].tolist()
        order = sorted(range(len(visual)), key=lambda i: (-seg_scores[i], i))
        keep = step.keep if step else len(visual)
        kept = {visual[i] for i in order[:keep]}
        head_end = start + sample.head_length
        head = [r for r in rows if r < head_end and (r not in visual or r in kept)]
        text = [r for r in rows if r >= head_end]
        merged_h, merged_rows = [], []
        if step and step.n_clusters:
            recycled = sorted(visual[i] for i in order[keep:keep + step.n_recycled])
            merged, centres, _ = naive_density_peak(hidden[recycled].double(), step.n_clusters)
            merged_h, merged_rows = list(merged.float()), [recycled[c] for c in centres]
        expected_hidden += [hidden[r] for r in head] + merged_h + [hidden[r] for r in text]
        expected_positions += head + merged_rows + text
        ids = [visual.index(r) if r in visual else NOT_VISUAL for r in head + text]
        expected_ids += ids[:len(head)] + [MERGED] * len(merged_rows) + ids[len(head):]
        start += sample.num_tokens
        vis_start += len(visual)
    torch.testing.assert_close(new_hidden, torch.stack(expected_hidden), rtol=1e-5, atol=1e-5)
    assert torch.equal(new_positions, positions[:, expected_positions])
    assert torch.equal(new_rotary[0], rotary[0][:, expected_positions])
    assert pack.visual_ids.tolist() == expected_ids
    assert pack.lengths == [6 + 2 + 2 + 3 + 5, 7, 10 + 3 + 4 + 1 + 9]


def test_rater_attention_rank_matches_matrix_rank_of_the_sliced_attention():
    from sparsevlm.pruning.scoring import rater_attention_ranks

    g = torch.Generator().manual_seed(4)
    samples = [make_sample(0, 3, 20, 2, 5), make_sample(1, 2, 12, 0, 8)]
    plans = [SamplePlan(s.num_visual_tokens, (), ()) for s in samples]
    pack = PrunedPack(samples, plans, torch.device("cpu"))
    total = sum(s.num_tokens for s in samples)
    q, k = torch.randn(total, 4, 16, generator=g), torch.randn(total, 2, 16, generator=g)
    weights = torch.tensor([1, 0, 1, 1, 0] + [1, 1, 0, 0, 1, 0, 0, 1], dtype=torch.float32)
    weights[weights > 0] = 1.0  # only which are raters matters here
    ranks = rater_attention_ranks(pack, weights, q, k, 0.25)
    start = 0
    for sample, rank, text_weights in zip(samples, ranks, (weights[:5], weights[5:])):
        rows = torch.arange(start, start + sample.num_tokens)
        raters = rows[sample.head_length:][text_weights > 0]
        visual = rows[sample.is_visual]
        per_head = []
        for h in range(4):  # head h reads KV head h // 2
            logits = q[start:start + sample.num_tokens, h] @ k[start:start + sample.num_tokens, h // 2].T * 0.25
            logits = logits.masked_fill(~torch.ones_like(logits, dtype=torch.bool).tril(), float("-inf"))
            per_head.append(logits.softmax(-1)[raters - start][:, visual - start])
        expected = torch.linalg.matrix_rank(torch.stack(per_head).mean(0).double())
        assert rank == int(expected)
        start += sample.num_tokens
