"""SparseVLM and the baselines inside the engine (CPU, fp32, tiny models of both families)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine
from sparsevlm.pruning.schedule import plan_sample

from helpers import chat, mixed_samples, random_image

PARAMS = SamplingParams(max_new_tokens=6)
METHODS = [  # the tiny models have 4 layers: every preset is out of reach there (flagged, pruned to the floor)
    SparsityConfig(method="sparsevlm", preset=64),
    SparsityConfig(method="sparsevlm", schedule={1: 0.5, 2: 0.25}),
    SparsityConfig(method="sparsevlm", keep_ratio=0.3),
    SparsityConfig(method="sparsevlm_v2", keep_ratio=0.4),
    SparsityConfig(method="fastv", keep_ratio=0.3),
    SparsityConfig(method="random", keep_ratio=0.5, seed=3),
]



@pytest.fixture(scope="module")
def engine(any_engine):
    """Every family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-1.5 and LLaVA-OneVision."""
    return any_engine


@pytest.fixture(scope="module")
def samples(engine):
    return mixed_samples(engine.processor)


@pytest.fixture(scope="module")
def dense(engine, samples):
    return engine.generate(samples, PARAMS)


@pytest.mark.parametrize("sparsity", [
    SparsityConfig(method="sparsevlm", schedule={0: 1.0, 1: 1.0, 2: 1.0}),
    SparsityConfig(method="sparsevlm_v2", schedule={1: 1.0}),
    SparsityConfig(method="fastv", keep_ratio=1.0),
    SparsityConfig(method="random", schedule={0: 1.0, 2: 1.0}),
], ids=lambda c: c.method)
def test_keeping_everything_reproduces_dense(engine, samples, dense, sparsity):
    results = engine.generate(samples, PARAMS, sparsity=sparsity)
    for i, (result, reference) in enumerate(zip(results, dense)):
        assert result.token_ids == reference.token_ids, f"sample {i}"
        assert result.stats.kept_visual_positions == list(range(reference.stats.n_visual_tokens))


@pytest.mark.parametrize("sparsity", METHODS, ids=lambda c: c.label)
def test_sample_outputs_do_not_depend_on_the_batch(engine, samples, sparsity):
    together = engine.generate(samples, PARAMS, sparsity=sparsity)
    repacked = VLMEngine(engine.model, engine.processor, sparsity=sparsity,  # engine default, not an override
                         engine_config=EngineConfig(max_prefill_tokens=120, max_num_seqs=3))
    order = [5, 2, 7, 0, 6, 1, 4, 3]
    shuffled = repacked.generate([samples[i] for i in order], PARAMS)
    for position, i in enumerate(order):
        alone = engine.generate([samples[i]], PARAMS, sparsity=sparsity)[0]
        for other in (together[i], shuffled[position]):
            assert other.token_ids == alone.token_ids, f"sample {i}"
            assert other.stats.kept_visual_positions == alone.stats.kept_visual_positions, f"sample {i}"


@pytest.mark.parametrize("sparsity", METHODS, ids=lambda c: c.label)
def test_stats_follow_the_plan(engine, samples, sparsity):
    results = engine.generate(samples, PARAMS, sparsity=sparsity)
    num_layers = engine.model.config.text_config.num_hidden_layers
    pruned_any = False
    for result in results:
        stats = result.stats
        plan = plan_sample(sparsity, num_layers, stats.n_visual_tokens)
        assert stats.method == sparsity.label
        assert stats.n_visual_tokens_kept == plan.final_visual
        assert stats.kept_per_pruning_layer == {s.layer: s.keep + s.n_clusters for s in plan.steps}
        assert stats.equiv_visual_tokens == pytest.approx(plan.equivalent_visual_tokens)
        assert stats.budget_met == plan.budget_met == (sparsity.preset is None or not stats.n_visual_tokens)
        kept = stats.kept_visual_positions
        assert kept == sorted(set(kept)) and all(0 <= i < stats.n_visual_tokens for i in kept)
        final_keep = plan.steps[-1].keep if plan.steps else stats.n_visual_tokens
        assert len(kept) <= final_keep  # merged tokens are not original positions
        if plan.steps and plan.final_visual < stats.n_visual_tokens:
            pruned_any = True
            assert stats.prefill_flops < stats.prefill_flops_dense
        else:
            assert stats.prefill_flops == pytest.approx(stats.prefill_flops_dense)
        assert stats.n_generated_tokens == len(result.token_ids) > 0
        assert stats.sparse_ms >= 0 and stats.sparse_ms <= stats.prefill_ms
    assert pruned_any


def test_recycling_adds_merged_tokens_and_changes_nothing_else_in_the_plan(engine, samples):
    recycling = SparsityConfig(method="sparsevlm", keep_ratio=0.3)
    with_recycling = engine.generate(samples, PARAMS, sparsity=recycling)
    without = engine.generate(samples, PARAMS,
                              sparsity=SparsityConfig(method="sparsevlm", keep_ratio=0.3, recycle=False))
    num_layers = engine.model.config.text_config.num_hidden_layers
    for a, b in zip(with_recycling, without):
        (step,) = plan_sample(recycling, num_layers, a.stats.n_visual_tokens).steps or (None,)
        if step is None:
            continue
        assert step.n_clusters >= 1
        assert a.stats.n_visual_tokens_kept == b.stats.n_visual_tokens_kept + step.n_clusters
        assert a.stats.kept_visual_positions == b.stats.kept_visual_positions  # same scores, same top-k


def test_questions_guide_what_is_kept(engine):
    """Same image, different questions: the raters differ, so the kept sets do too."""
    processor = engine.processor
    image = random_image(np.random.default_rng(7), 224, 224)
    questions = ["What colour is the car on the left?", "How many people are in the photo? Answer with one word.",
                 "Read the sign.", "Is there a dog?"]
    samples = [processor(text=[chat(processor, "image", text=q)], images=[image]) for q in questions]
    sparsity = SparsityConfig(method="sparsevlm", schedule={0: 0.25}, recycle=False)
    results = engine.generate(samples, PARAMS, sparsity=sparsity)
    kept = [tuple(r.stats.kept_visual_positions) for r in results]
    assert len(kept[0]) == round(0.25 * results[0].stats.n_visual_tokens)
    assert len(set(kept)) > 1, "every question kept the same visual tokens"


def test_invalid_budgets_say_what_to_fix():
    with pytest.raises(ValueError, match="one budget"):
        SparsityConfig(method="sparsevlm", preset=64, keep_ratio=0.5)
    with pytest.raises(ValueError, match="preset=100 is not a preset"):
        SparsityConfig(method="sparsevlm", preset=100)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        SparsityConfig(method="fastv", keep_ratio=1.5)
    with pytest.raises(ValueError, match="a ratio must be in"):
        SparsityConfig(method="sparsevlm", schedule={2: 1.5})
    with pytest.raises(ValueError, match="not available"):
        SparsityConfig(method="pdrop")
    with pytest.raises(ValueError, match="recycle applies"):
        SparsityConfig(method="fastv", recycle=True)


def test_rank_adaptive_keeps_at_most_the_budget_and_is_batch_invariant(engine, samples):
    budget = SparsityConfig(method="sparsevlm", schedule={1: 0.8, 2: 0.5})
    adaptive = SparsityConfig(method="sparsevlm", schedule={1: 0.8, 2: 0.5}, rank_adaptive=True, rank_scale=1.0,
                              rank_bias=1.0)
    fixed = engine.generate(samples, PARAMS, sparsity=budget)
    together = engine.generate(samples, PARAMS, sparsity=adaptive)
    smaller = False
    for i, (a, b) in enumerate(zip(together, fixed)):
        assert set(a.stats.kept_per_pruning_layer) == set(b.stats.kept_per_pruning_layer)
        for layer, kept in a.stats.kept_per_pruning_layer.items():
            assert 1 <= kept <= b.stats.kept_per_pruning_layer[layer]
            smaller |= kept < b.stats.kept_per_pruning_layer[layer]
        alone = engine.generate([samples[i]], PARAMS, sparsity=adaptive)[0]
        assert alone.token_ids == a.token_ids and alone.stats.kept_visual_positions == a.stats.kept_visual_positions
    assert smaller, "rank-adaptive never kept fewer tokens than the budget"
