"""`benchmarks.throughput --pixels`: the engine handed the processor's float patches or, as the
pipeline hands them, its resized uint8 frames; the same visual tokens either way."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import throughput


def run(tmp_path, monkeypatch, pixels: str) -> dict:
    out = tmp_path / f"{pixels}.json"
    monkeypatch.setattr(sys, "argv", ["throughput", "--workloads", "vqa-256,video-16f", "--num-samples", "2",
                                      "--repeats", "1", "--methods", "none", "--hf-batch-sizes", "",
                                      "--vllm", "off", "--pixels", pixels, "--json", str(out)])
    throughput.main()
    return json.loads(out.read_text())


def test_frames_and_patches_give_the_engine_the_same_visual_tokens(tmp_path, monkeypatch):
    frames, patches = run(tmp_path, monkeypatch, "frames"), run(tmp_path, monkeypatch, "patches")
    assert (frames["pixels"], patches["pixels"]) == ("frames", "patches")
    assert [(r["workload"], r["n_visual_tokens"]) for r in frames["rows"]] == \
        [(r["workload"], r["n_visual_tokens"]) for r in patches["rows"]]


def test_make_inputs_hands_uint8_frames_with_frames():
    from benchmarks.workloads import load_model

    _, processor = load_model("tiny", "cpu")
    samples, new_tokens, _ = throughput.make_inputs(processor, "vqa-256", 2, "tiny", frames=True)
    assert all("image_frames" in s and "pixel_values" not in s for s in samples) and len(new_tokens) == 2
    patches, _, _ = throughput.make_inputs(processor, "vqa-256", 2, "tiny")
    assert all("pixel_values" in s for s in patches)


def test_frames_with_hf_rows_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["throughput", "--pixels", "frames", "--vllm", "off"])
    with pytest.raises(SystemExit):
        throughput.main()
