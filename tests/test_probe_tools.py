"""The probe's training examples and the accuracy benchmark, end to end on a tiny CPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import scenes  # noqa: E402
import train_probe  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A few CPU training steps of the small probe: a real checkpoint, not a good one."""
    out = tmp_path_factory.mktemp("probe") / "scene-probe"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_probe.py"), "--out", str(out), "--minutes",
                    "0.05", "--small", "--workers", "0", "--batch-size", "2", "--eval-n", "8",
                    "--archive", str(out.parent / "parts")], check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_only_answer_tokens_are_learned(checkpoint):
    from sparsevlm.preprocess import QwenVLProcessor

    processor = QwenVLProcessor.from_pretrained(checkpoint)
    for index in (0, 6):  # an image and a video question
        sample = scenes.sample_at(3, index)
        example = train_probe.encode(processor, sample)
        prompt = train_probe.encode(processor, sample, with_answer=False)
        n_prompt = prompt["input_ids"].shape[1]
        assert torch.equal(example["input_ids"][:, :n_prompt], prompt["input_ids"])  # inference sees this prompt
        learned = example["labels"][example["labels"] != -100]
        assert processor.tokenizer.decode(learned) == sample.answer + "<|im_end|>"
        assert (example["labels"][:, :n_prompt] == -100).all()
    batch = train_probe.collate([train_probe.encode(processor, scenes.sample_at(3, i)) for i in (0, 6)], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert "pixel_values" in batch and "pixel_values_videos" in batch


@pytest.mark.slow
def test_training_writes_a_checkpoint_the_accuracy_benchmark_reads(checkpoint, tmp_path):
    training = json.loads((checkpoint / "training.json").read_text())
    assert training["steps"] >= 1 and training["held_out"]["n"] == 8
    out = tmp_path / "accuracy.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--model", str(checkpoint), "--seed",
                    "5", "--n", "8", "--method", "sparsevlm", "--preset", "64", "--json", str(out)],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["n"] == 8 and 0.0 <= result["accuracy"] <= 1.0 and result["method"] == "sparsevlm-64"
    assert set(result["by_type"]) == set(scenes.IMAGE_TYPES + scenes.VIDEO_TYPES)
    assert result["equiv_visual_tokens_mean"] < result["visual_tokens_mean"]


@pytest.mark.slow
def test_archive_parts_rebuild_the_checkpoint(checkpoint, tmp_path):
    import tarfile

    parts = sorted((checkpoint.parent / "parts").glob("scene-probe.tar.gz.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    joined = tmp_path / "probe.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path, filter="data")
    for original in checkpoint.iterdir():
        assert (tmp_path / "scene-probe" / original.name).read_bytes() == original.read_bytes()

    small = train_probe.archive(checkpoint, tmp_path / "small-parts", part_bytes=100_000)
    assert len(small) > 1 and b"".join(p.read_bytes() for p in small)[:2] == b"\x1f\x8b"  # gzip, split
