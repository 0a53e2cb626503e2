"""Shared fixtures: tiny checkpoints built offline once per session, and sample builders."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU; must precede triton's import
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every Ray cluster a test starts is a throwaway local one: no token to hand around. Set once for
# the whole session: Ray keeps the mode a driver first saw, so a module that changed it for its own
# cluster left later in-process clusters unable to start ("Failed to start GCS", InvalidAuthToken).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
ALL_FAMILIES = FAMILIES + ("qwen3_vl", "llava", "llava_onevision")  # modules for every family ask for `any_engine`


# Modules whose jobs run engines in Ray workers, which inherit this process's environment: under
# TRITON_INTERPRET their engines would score in the Triton interpreter, minutes per job. The
# kernels' own tests (and the in-process engine tests elsewhere) keep it.
RAY_JOB_MODULES = {"test_jobs", "test_faults", "test_cost_report", "test_ray_job_submit", "test_multinode", "test_llava",
                   "test_llava_onevision", "test_qwen3_vl"}


@pytest.fixture(scope="module", autouse=True)
def _ray_workers_run_plain_torch(request):
    with pytest.MonkeyPatch.context() as env:  # module scope: before the modules' own module fixtures
        if request.module.__name__ in RAY_JOB_MODULES:
            env.delenv("TRITON_INTERPRET", raising=False)
        yield


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
    return {family: str(build_tiny_checkpoint(root / family, family)) for family in ALL_FAMILIES}


def _cpu_engine(path: str):
    from sparsevlm import VLMEngine

    return VLMEngine.from_pretrained(path, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session", params=FAMILIES)
def engine(request, tiny_checkpoints):
    return _cpu_engine(tiny_checkpoints[request.param])


@pytest.fixture(scope="session", params=ALL_FAMILIES)
def any_engine(request, tiny_checkpoints):
    return _cpu_engine(tiny_checkpoints[request.param])
