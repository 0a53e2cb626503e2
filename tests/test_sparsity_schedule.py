"""Budgets at any depth, SparseVLM+'s keep tables, and the one sparsity grammar (labels)."""

from __future__ import annotations

import itertools
import math

import pytest

from sparsevlm.config import PRESETS, SPARSITY_METHODS, SparsityConfig, parse_label
from sparsevlm.pruning.schedule import plan_sample

DEPTHS = (8, 24, 28, 32, 36)
PRUNING = ("sparsevlm", "sparsevlm_v2", "fastv", "random")


@pytest.mark.parametrize("num_layers", DEPTHS)
def test_presets_at_any_depth_prune_after_mixing_and_meet_the_layer_average_or_say_so(num_layers):
    for method, preset, num_visual in itertools.product(PRUNING, PRESETS, (256, 576, 1024)):
        config = SparsityConfig(method=method, preset=preset)
        plan = plan_sample(config, num_layers, num_visual)
        layers = [step.layer for step in plan.steps]
        assert layers == sorted(set(layers)) and layers[-1] < num_layers - 1
        # two layers of attention before the first prune, and at least the reference's dense share
        # of depth (3 of its 32 layers see every token)
        assert layers[0] >= 2 and layers[0] + 1 >= math.floor(3 * num_layers / 32)
        target = preset * num_visual / 576
        assert plan.target_equivalent == pytest.approx(target)
        reached = plan.equivalent_visual_tokens
        if plan.budget_met:  # within whole-token rounding of the target, neither side
            assert abs(reached - target) <= 0.02 * target + 1, (config.label, num_layers, num_visual, reached)
        else:  # only where the dense layers alone already pass the target
            assert layers[0] * num_visual / num_layers > target, (config.label, num_layers, num_visual)
            # then it keeps what the reference depth keeps, scaled to the tokens: never fewer
            reference = plan_sample(config, 32, num_visual)
            if method in ("fastv", "random"):
                assert [s.keep for s in plan.steps] == [s.keep for s in reference.steps]
            else:
                assert [s.keep for s in plan.steps] == [s.keep for s in reference.steps][:len(plan.steps)]
        if method in ("fastv", "random"):
            assert len(plan.steps) == 1 and layers[0] == max(2, round(3 * num_layers / 32) - 1)


def test_the_papers_own_setting_keeps_its_tables_as_written():
    v1 = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
    v2 = {192: (300, 200, 110), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}  # official v2.0
    for method, table in (("sparsevlm", v1), ("sparsevlm_v2", v2)):
        for preset, keeps in table.items():
            plan = plan_sample(SparsityConfig(method=method, preset=preset), 32, 576)
            assert [(s.layer, s.keep) for s in plan.steps] == list(zip((2, 6, 15), keeps))
            assert all(s.n_clusters == 0 for s in plan.steps) == (method == "sparsevlm_v2")  # v2: no recycling
    # and at 32 layers with more visual tokens, the same table scaled by the token count
    plan = plan_sample(SparsityConfig(method="sparsevlm_v2", preset=128), 32, 1152)
    assert [s.keep for s in plan.steps] == [476, 216, 120]


def test_shallow_models_say_when_a_preset_is_out_of_reach(caplog):
    plan = plan_sample(SparsityConfig(method="sparsevlm", preset=64, tau=0.25), 8, 256)
    assert not plan.budget_met and plan.equivalent_visual_tokens > plan.target_equivalent
    assert "asks for a layer average of 28.4" in caplog.text and "budget_met=False" in caplog.text
    explicit = plan_sample(SparsityConfig(method="sparsevlm", schedule={0: 29, 2: 13, 4: 8}), 8, 256)
    assert [s.layer for s in explicit.steps] == [0, 2, 4] and explicit.budget_met  # a schedule is taken as written


def test_fastv_layer_is_kept_when_given():
    plan = plan_sample(SparsityConfig(method="fastv", preset=128, fastv_layer=0), 28, 576)
    assert plan.steps[0].layer == 0 and plan.budget_met


LABELS = [
    SparsityConfig(),
    *[SparsityConfig(method=m, preset=p) for m in PRUNING for p in PRESETS],
    *[SparsityConfig(method=m, keep_ratio=r) for m in PRUNING for r in (0.25, 1.0, 0.123456789)],
    *[SparsityConfig(method=m, schedule={2: 300, 6: 0.5, 15: 1.0}) for m in PRUNING],
    SparsityConfig(method="sparsevlm", schedule={0: 0}),
    SparsityConfig(method="sparsevlm", preset=64, tau=0.25, theta=0.05, recycle=False),
    SparsityConfig(method="sparsevlm", rank_adaptive=True, rank_scale=8.0, rank_bias=-1.5),
    SparsityConfig(method="sparsevlm_v2", preset=96, recycle=True),
    SparsityConfig(method="fastv", keep_ratio=0.3, fastv_layer=4),
    SparsityConfig(method="random", preset=192, seed=7, fastv_layer=0),
]


@pytest.mark.parametrize("config", LABELS, ids=lambda c: c.label)
def test_labels_read_back_as_the_same_config(config):
    assert SparsityConfig.parse(config.label) == config
    assert SparsityConfig.parse(config.label).label == config.label
    assert SparsityConfig(**parse_label(config.label)) == config


def test_label_forms_and_mistakes():
    assert SparsityConfig(method="sparsevlm").label == "sparsevlm-128"  # the default budget, spelled out
    assert SparsityConfig(method="fastv", keep_ratio=0.25).label == "fastv-r0.25"
    assert SparsityConfig.parse("fastv-0.25") == SparsityConfig(method="fastv", keep_ratio=0.25)  # older form
    assert SparsityConfig.parse("sparsevlm-2:300,6:r0.5").schedule == ((2, 300), (6, 0.5))
    assert parse_label("sparsevlm_v2") == {"method": "sparsevlm_v2"}
    assert set(SPARSITY_METHODS) == {"none", *PRUNING}
    for bad, why in [("sparse-128", "unknown method"), ("sparsevlm-many", "not a number"),
                     ("sparsevlm-128+tau", "unknown option"), ("sparsevlm-128+recycle=maybe", "on or off"),
                     ("none-128", "takes no budget"), ("sparsevlm-100", "not a preset"),
                     ("fastv-128+recycle=on", "recycle applies")]:
        with pytest.raises(ValueError, match=why):
            SparsityConfig.parse(bad)
