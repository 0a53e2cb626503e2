"""LLaVA-OneVision specifics (exactness and pruning run for it in test_engine_matches_generate and
test_sparse_engine): the torchvision-free processor, uint8 tiles and frames, refusals, the jobs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from sparsevlm import SamplingParams, SparsityConfig, VLMEngine

from helpers import chat, random_image


@pytest.fixture(scope="module")
def onevision(tiny_checkpoints) -> VLMEngine:
    return VLMEngine.from_pretrained(tiny_checkpoints["llava_onevision"], dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("sizes", [[(60, 80)], [(300, 120), (57, 56)], [(20, 33)]])
def test_frames_normalised_on_the_device_equal_the_processors_pixels(onevision, sizes):
    processor, adapter = onevision.processor, onevision.adapter
    rng = np.random.default_rng(len(sizes))
    images = [random_image(rng, *size) for size in sizes]
    video = [random_image(rng, 70, 90) for _ in range(3)]
    prompt = chat(processor, *["image"] * len(images), "video", text="Describe.")
    pixels = processor(text=[prompt], images=images, videos=[video])
    frames = processor(text=[prompt], images=images, videos=[video], return_frames=True)
    assert torch.equal(pixels["input_ids"], frames["input_ids"])
    prepared, reference = adapter.prepare(frames, 0), adapter.prepare(pixels, 0)
    for key in ("image_tiles", "video_frames"):
        ours, theirs = adapter.pixels(prepared, key), adapter.pixels(reference, key)
        assert ours[0].dtype == torch.float32 and len(ours) == len(theirs)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))  # bit for bit
    assert torch.equal(frames["image_grid_thw"][:, 1:], pixels["image_sizes"])


def test_frames_and_pixel_values_generate_the_same(onevision):
    processor = onevision.processor
    rng = np.random.default_rng(3)
    images, video = [random_image(rng, 90, 170)], [random_image(rng, 64, 64) for _ in range(4)]
    prompt = chat(processor, "image", "video", text="Compare them.")
    as_pixels = processor(text=[prompt], images=images, videos=[video])
    as_frames = processor(text=[prompt], images=images, videos=[video], return_frames=True)
    reference = onevision.model.generate(**as_pixels, max_new_tokens=8, do_sample=False)
    dense = onevision.generate([as_pixels, as_frames], SamplingParams(max_new_tokens=8))
    assert [r.token_ids for r in dense] == [reference[0, as_pixels["input_ids"].shape[1]:].tolist()] * 2
    a, b = onevision.generate([as_pixels, as_frames], SamplingParams(max_new_tokens=8),
                              sparsity=SparsityConfig(method="sparsevlm", keep_ratio=0.4))
    assert a.token_ids == b.token_ids and a.stats.kept_visual_positions == b.stats.kept_visual_positions


def test_wrong_token_counts_are_refused(onevision):
    processor = onevision.processor
    sample = dict(processor(text=[chat(processor, "image", text="Read the sign.")],
                            images=[random_image(np.random.default_rng(0), 40, 90)]))
    ids = sample["input_ids"]
    first = int((ids[0] == onevision.model.config.image_token_id).nonzero()[0])
    sample["input_ids"] = torch.cat([ids[:, :first], ids[:, first + 1:]], dim=1)  # one placeholder fewer
    sample["attention_mask"] = torch.ones_like(sample["input_ids"])
    with pytest.raises(ValueError, match="image tokens in input_ids but its images need"):
        onevision.generate([sample])
    sample = dict(sample, input_ids=ids, attention_mask=torch.ones_like(ids), image_sizes=torch.tensor([[400, 90]]))
    with pytest.raises(ValueError, match="the processor does not belong to this model"):  # another image's tiling
        onevision.generate([sample])


def test_equals_transformers_processor_with_torchvision(onevision, tiny_checkpoints):
    """Runs where torchvision exists (the GPU machine): transformers' own full processor."""
    pytest.importorskip("torchvision", reason="transformers' OneVision processor needs torchvision")
    from transformers import AutoProcessor

    reference_processor = AutoProcessor.from_pretrained(tiny_checkpoints["llava_onevision"])
    processor = onevision.processor
    rng = np.random.default_rng(3)
    images = [random_image(rng, 120, 90), random_image(rng, 64, 300)]
    video = np.stack([np.asarray(random_image(rng, 80, 110)) for _ in range(4)])
    prompt = chat(processor, "image", "image", "video", text="Describe.")
    ours = processor(text=[prompt], images=images, videos=[video])
    reference = reference_processor(text=[prompt], images=images, videos=[video], return_tensors="pt")
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["image_sizes"], reference["image_sizes"])
    # transformers' full processor resizes through torchvision, ours through PIL: the same tiles, up to
    # one 8-bit level in a few pixels (seen on the GPU machine: 0.4% of values, one level each)
    levels = (ours["pixel_values"] - reference["pixel_values"]).abs() * 0.5 * 255
    assert levels.max() < 1.01 and (levels > 0.01).float().mean() < 0.01, (levels.max().item(),
                                                                            (levels > 0.01).float().mean().item())
    diff = (ours["pixel_values_videos"] - reference["pixel_values_videos"]).abs() * 0.5 * 255
    assert diff.mean() < 1.0 and diff.max() < 16, (diff.mean().item(), diff.max().item())


@pytest.mark.slow
def test_the_jobs_run_on_onevision(tmp_path, tiny_checkpoints):
    import io

    import ray

    from pipeline.cli import main

    rng = np.random.default_rng(5)

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    ids = [f"img-{i}" for i in range(5)]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "image": [png(random_image(rng, 40 + 20 * i, 64)) for i in range(5)]}),
                   source)
    model = tiny_checkpoints["llava_onevision"]
    common = ["--model", model, "--max-new-tokens", "4", "--batch-size", "4", "--sparsity", "sparsevlm-r0.5"]
    try:
        assert main("image", "test", base={"generation": {"task": "caption"}},
                    argv=[*common, "--input", str(source), "--output", str(tmp_path / "images")]) == 0
        assert main("video", "test", base={"generation": {"task": "caption"}},
                    argv=[*common, "--output", str(tmp_path / "videos"), "--num-frames", "4"]) == 0
    finally:
        ray.shutdown()
    for folder, expected in (("images", ids), ("videos", None)):
        rows = pads.dataset(str(tmp_path / folder), format="parquet").to_table().to_pylist()
        if expected is not None:
            assert sorted(r["id"] for r in rows) == sorted(expected)
        assert rows and all(r["error"] is None and r["n_generated_tokens"] >= 1 for r in rows), rows
        assert all(r["n_visual_tokens_kept"] < r["n_visual_tokens"] for r in rows)
