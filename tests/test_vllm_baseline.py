"""The vLLM baseline's harness, with a stand-in for vLLM's LLM (vLLM itself runs on the GPU machine
only): the fairness rules it promises (fresh media each run, the engine's own images in the first
timed run, caches off, fixed output length, median of >= 3) and the weight-free model folder it loads."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoConfig

from benchmarks import vllm_baseline
from benchmarks.workloads import MIXED, WORKLOADS, load_processor, mixed_plan, random_media, write_model_folder


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    """Records every generate call; answers with as many tokens as asked (or `short` fewer)."""

    def __init__(self, short: int = 0):
        self.calls, self.short = [], short

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(p.max_tokens - self.short)))])
                for p in params]


def media_digest(request) -> str:
    data = request["multi_modal_data"]
    pixels = data["video"][0] if "video" in data else np.asarray(data["image"])
    return hashlib.sha1(pixels.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl_7b")
    write_model_folder("qwen2_5_vl_7b", folder)
    return load_processor("qwen2_5_vl_7b", folder)


def test_the_model_folder_loads_as_the_architecture_without_weights(tmp_path):
    for name, architecture, hidden in [("qwen2_5_vl_7b", "Qwen2_5_VLForConditionalGeneration", 3584),
                                       ("llava_onevision_7b", "LlavaOnevisionForConditionalGeneration", 3584)]:
        write_model_folder(name, tmp_path / name)
        config = AutoConfig.from_pretrained(tmp_path / name)
        assert config.architectures == [architecture]  # what vLLM's dummy loader picks the model class by
        assert config.text_config.hidden_size == hidden
        assert not list((tmp_path / name).glob("*.safetensors"))
        load_processor(name, tmp_path / name)


@pytest.mark.parametrize("workload", ["video-16f", MIXED])
def test_every_run_sees_fresh_media_and_the_first_sees_the_engines(processor, workload):
    llm, count = FakeLLM(), 3
    row = vllm_baseline.measure(llm, FakeSamplingParams, processor, workload, count, repeats=3)
    assert len(llm.calls) == 1 + 3  # a warm-up, then three timed runs
    digests = [media_digest(r) for requests, _ in llm.calls for r in requests]
    assert len(set(digests)) == len(digests)  # no image or video repeats, within or across runs
    plan = vllm_baseline.plan_for(workload, count)
    first_timed = llm.calls[1][0]
    for request, (kind, seed, _) in zip(first_timed, plan):
        media = random_media(kind, seed)  # what throughput.py's engine rows are built from
        expected = np.stack([np.asarray(f) for f in media]) if kind.is_video else np.asarray(media)
        got = request["multi_modal_data"]["video" if kind.is_video else "image"]
        if kind.is_video:  # frames and the metadata Qwen3-VL's parser requires
            got, metadata = got
            assert metadata["frames_indices"] == list(range(kind.num_frames))
            assert metadata["total_num_frames"] == kind.num_frames and metadata["do_sample_frames"] is False
        np.testing.assert_array_equal(np.asarray(got), expected)
        placeholder = "<|video_pad|>" if kind.is_video else "<|image_pad|>"
        assert request["prompt"].count(placeholder) == 1  # vLLM expands the one placeholder itself
    for _, params in llm.calls:
        assert [(p.max_tokens, p.min_tokens, p.ignore_eos, p.temperature) for p in params] == \
            [(n, n, True, 0.0) for *_, n in plan]
    assert row["batch_size"] == count and len(row["runs_s"]) == 3
    assert row["seconds"] == sorted(row["runs_s"])[1]
    assert row["prefix_caching"] is False and row["fresh_media_per_run"] is True


def test_fewer_repeats_than_three_still_time_three_runs(processor):
    llm = FakeLLM()
    row = vllm_baseline.measure(llm, FakeSamplingParams, processor, "vqa-256", 2, repeats=1)
    assert len(row["runs_s"]) == 3 and len(llm.calls) == 4


def test_a_run_that_stops_early_is_an_error_not_a_row(processor):
    with pytest.raises(RuntimeError, match="asked for"):
        vllm_baseline.measure(FakeLLM(short=1), FakeSamplingParams, processor, "vqa-256", 2)


def test_caches_are_off_and_evs_is_opt_in(tmp_path):
    dense = vllm_baseline.engine_kwargs(tmp_path, None, 64)
    assert dense["enable_prefix_caching"] is False and dense["mm_processor_cache_gb"] == 0
    assert dense["load_format"] == "dummy" and "video_pruning_rate" not in dense
    assert vllm_baseline.engine_kwargs(tmp_path, 0.75, 64)["video_pruning_rate"] == 0.75
    assert vllm_baseline.engine_kwargs(tmp_path, None, 64, video=False)["limit_mm_per_prompt"] == {"image": 1}
    assert "quantization" not in dense
    assert vllm_baseline.engine_kwargs(tmp_path, None, 64, quantization="fp8")["quantization"] == "fp8"


def test_the_mixed_plan_is_ragged_and_fixed_workloads_are_not():
    plan = mixed_plan(40)
    assert {kind.name for kind, *_ in plan} == {"vqa-256", "vqa-1024", "video-16f"}
    assert min(n for *_, n in plan) >= 3 and max(n for *_, n in plan) <= 128 and len({n for *_, n in plan}) > 10
    assert {n for *_, n in vllm_baseline.plan_for("caption-1024", 4)} == {WORKLOADS["caption-1024"].max_new_tokens}


def test_engine_rows_are_compared_with_vllm_dense_on_their_own_workload():
    from benchmarks.throughput import compare_with_vllm

    rows = [{"workload": "vqa-1024", "system": "engine_none", "samples_per_s": 30.0},
            {"workload": "vqa-1024", "system": "engine_sparsevlm-128", "samples_per_s": 45.0},
            {"workload": "video-16f", "system": "engine_none", "samples_per_s": 9.0},
            {"workload": "vqa-1024", "system": "vllm_dense", "samples_per_s": 20.0},
            {"workload": "video-16f", "system": "vllm_evs0.75", "samples_per_s": 7.0}]
    compare_with_vllm(rows)
    assert [r.get("speedup_vs_vllm_dense") for r in rows] == [1.5, 2.25, None, None, None]
    assert all("speedup_vs_vllm_fp8" not in r for r in rows)
    rows.append({"workload": "vqa-1024", "system": "vllm_fp8", "samples_per_s": 25.0})
    compare_with_vllm(rows)
    assert rows[0]["speedup_vs_vllm_fp8"] == 1.2 and "speedup_vs_vllm_fp8" not in rows[2]


def test_on_a_jobs_images_each_timed_run_takes_rows_no_other_run_saw(processor, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(9):  # 9 rows: quarters of 2, the last row left out
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    path = tmp_path / "inputs.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(9)], "image": encoded}), path)
    llm = FakeLLM()
    row = vllm_baseline.measure_parquet(llm, FakeSamplingParams, processor, path, "What is it?", 16)
    assert [len(requests) for requests, _ in llm.calls] == [2, 2, 2, 2]
    digests = [media_digest(r) for requests, _ in llm.calls for r in requests]
    assert len(set(digests)) == 8
    assert all("What is it?" in r["prompt"] for requests, _ in llm.calls for r in requests)
    assert row["batch_size"] == 2 and len(row["runs_s"]) == 3 and row["samples_per_s"] == 2 / row["seconds"]
    with pytest.raises(RuntimeError, match="short"):
        vllm_baseline.measure_parquet(FakeLLM(short=2), FakeSamplingParams, processor, path, "What is it?", 16)


def test_a_variant_vllm_cannot_build_is_reported_and_the_others_keep_their_rows(monkeypatch, capsys):
    """Seen on the GPU machine: the staged vLLM's FP8 path imports a package it lacks."""
    import sys
    import types

    def make_llm(**kwargs):
        if kwargs.get("quantization") == "fp8":
            raise ModuleNotFoundError("No module named 'compressed_tensors'")
        return FakeLLM()

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=make_llm, SamplingParams=FakeSamplingParams))
    rows = vllm_baseline.run("qwen2_5_vl_7b", ["vqa-256"], {"vqa-256": 2}, repeats=1, evs=None, fp8=True)
    assert [(r["workload"], r["system"]) for r in rows] == [("vqa-256", "vllm_dense")]
    assert "vllm_fp8: not measured" in capsys.readouterr().err
