"""Shared fixtures: tiny checkpoints built offline once per session, and sample builders."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU; must precede triton's import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    from sparsevlm.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {family: str(build_tiny_checkpoint(root / family, family)) for family in FAMILIES}


@pytest.fixture(scope="session", params=FAMILIES)
def engine(request, tiny_checkpoints):
    from sparsevlm import VLMEngine

    return VLMEngine.from_pretrained(tiny_checkpoints[request.param], dtype=torch.float32, device="cpu")
