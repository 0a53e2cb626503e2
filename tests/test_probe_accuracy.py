"""The committed scene probe (jobs/models/scene-probe) answers what it was trained on.

Dense accuracy through `VLMEngine` on CPU, a fixed small subset of a test seed the probe never
trained on (training uses seeds from 1,000,000 on). The probe has learned colour, shape,
existence, counting, motion and order; reading labels and left/right position are not learned
yet (see README, "Accuracy"), so those two are reported here, not held to the bar.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy  # noqa: E402

LEARNED = ("colour", "shape", "exists", "count", "motion", "order")


@pytest.fixture(scope="module")
def engine():
    from sparsevlm import VLMEngine

    return VLMEngine.from_pretrained(str(accuracy.PROBE), dtype=torch.float32, device="cpu")


@pytest.mark.slow
def test_dense_probe_answers_learned_question_types(engine):
    from sparsevlm import SparsityConfig

    result = accuracy.run(engine, seed=11, n=64, sparsity=SparsityConfig(method="none"))
    learned = [result["by_type"][t] for t in LEARNED]
    print(result)
    assert sum(learned) / len(learned) >= 0.9, result
    assert result["n"] == 64 and set(result["by_type"]) >= set(LEARNED)


@pytest.mark.slow
def test_the_probe_fits_the_size_budget():
    assert (accuracy.PROBE / "model.safetensors").stat().st_size <= 25 * 10**6
    assert all((accuracy.PROBE / name).exists() for name in
               ("config.json", "tokenizer.json", "preprocessor_config.json", "video_preprocessor_config.json"))
