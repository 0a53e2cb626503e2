"""Our top-level `kernels` package must not make transformers think HF's `kernels` is installed."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch


def test_import_kernels_is_ours():
    import kernels

    assert Path(kernels.__file__).parent == Path(__file__).parents[1] / "kernels"
    assert importlib.import_module("kernels.decode_attention")


def test_transformers_does_not_take_ours_for_hf_kernels(tiny_checkpoints):
    from transformers import AutoModelForImageTextToText
    from transformers.utils import is_kernels_available

    assert importlib.util.find_spec("kernels") is not None  # ours is importable...
    assert not is_kernels_available()  # ...and transformers does not mistake it for HF's
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["qwen2_vl"], dtype=torch.float32)
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
