"""LLaVA-1.5 specifics (the engine's exactness and pruning run for it in test_engine_matches_generate
and test_sparse_engine): transformers' own processor, uint8 frames, refusals, the job end to end."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from sparsevlm import SamplingParams, SparsityConfig, VLMEngine
from sparsevlm.adapters.llava import LlavaFrameProcessor

from helpers import chat, random_image


@pytest.fixture(scope="module")
def llava(tiny_checkpoints) -> VLMEngine:
    return VLMEngine.from_pretrained(tiny_checkpoints["llava"], dtype=torch.float32, device="cpu")


def test_the_processor_is_transformers_own_on_pil(llava):
    from transformers import LlavaProcessor
    from transformers.models.llava import LlavaImageProcessorPil

    assert isinstance(llava.processor.processor, LlavaProcessor)
    assert isinstance(llava.processor.image_processor, LlavaImageProcessorPil)


@pytest.mark.parametrize("size", [(60, 80), (300, 120), (57, 56), (20, 33)])
def test_frames_normalised_through_the_table_equal_the_processors_pixels(llava, size):
    processor = llava.processor
    image = random_image(np.random.default_rng(size[0]), *size)
    prompt = chat(processor, "image", text="What is in the picture?")
    pixels = processor(text=[prompt], images=[image])["pixel_values"]
    frames = processor(text=[prompt], images=[image], return_frames=True)
    (frame,) = frames["image_frames"]
    assert frame.dtype == torch.uint8 and tuple(frame.shape) == (1, 56, 56, 3)
    assert torch.equal(llava.adapter.pixels(llava.adapter.prepare(frames, 0)), pixels)  # bit for bit
    assert frames["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_equals_transformers_processor_with_torchvision(llava, tiny_checkpoints):
    """Runs where torchvision exists (the GPU machine): transformers' default (torchvision) backend."""
    pytest.importorskip("torchvision", reason="transformers' torchvision backend needs torchvision")
    from transformers import AutoProcessor

    reference_processor = AutoProcessor.from_pretrained(tiny_checkpoints["llava"])
    processor = llava.processor
    rng = np.random.default_rng(3)
    images = [random_image(rng, 120, 90), random_image(rng, 64, 300)]
    prompt = chat(processor, "image", "image", text="Describe.")
    ours = processor(text=[prompt], images=images)
    reference = reference_processor(text=[prompt], images=images, return_tensors="pt")
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    # torchvision's bicubic resize rounds differently from PIL's: compare in pixel units
    diff = (ours["pixel_values"] - reference["pixel_values"]).abs() * min(processor.image_processor.image_std) * 255
    assert diff.mean() < 1.0 and diff.max() < 16, (diff.mean().item(), diff.max().item())


def test_frames_and_pixel_values_generate_the_same(llava):
    processor = llava.processor
    rng = np.random.default_rng(3)
    images = [random_image(rng, 90, 70), random_image(rng, 64, 128)]
    prompt = chat(processor, "image", "image", text="Compare the two photos.")
    as_pixels = processor(text=[prompt], images=images)
    as_frames = processor(text=[prompt], images=images, return_frames=True)
    reference = llava.model.generate(**as_pixels, max_new_tokens=8, do_sample=False)
    dense = llava.generate([as_pixels, as_frames], SamplingParams(max_new_tokens=8))
    assert [r.token_ids for r in dense] == [reference[0, as_pixels["input_ids"].shape[1]:].tolist()] * 2
    a, b = llava.generate([as_pixels, as_frames], SamplingParams(max_new_tokens=8),
                          sparsity=SparsityConfig(method="sparsevlm", keep_ratio=0.4))
    assert a.token_ids == b.token_ids and a.stats.kept_visual_positions == b.stats.kept_visual_positions


def test_wrong_image_token_count_and_video_are_refused(llava):
    processor = llava.processor
    sample = processor(text=[chat(processor, "image", text="Read the sign.")],
                       images=[random_image(np.random.default_rng(0), 40, 40)])
    two_images = dict(sample, pixel_values=torch.cat([sample["pixel_values"]] * 2))  # one <image> in the prompt
    with pytest.raises(ValueError, match=r"16 <image> tokens in input_ids but 2 image\(s\) need 32 \(16 each\)"):
        llava.generate([two_images])
    with pytest.raises(ValueError, match="takes images only"):
        processor(text=[chat(processor, "video", text="Caption the video.")], videos=[[random_image(
            np.random.default_rng(1), 32, 32)]])


def test_processor_of_another_checkpoint_is_refused(llava, tiny_checkpoints):
    qwen = VLMEngine.from_pretrained(tiny_checkpoints["qwen2_5_vl"], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="different checkpoints"):
        VLMEngine(llava.model, qwen.processor)


def test_loads_by_family_from_config(tiny_checkpoints):
    from pipeline.model_source import check_model

    assert check_model(tiny_checkpoints["llava"], "image") == "llava"
    with pytest.raises(ValueError, match="llava models take images only; this job labels videos"):
        check_model(tiny_checkpoints["llava"], "video")
    assert isinstance(LlavaFrameProcessor.from_pretrained(tiny_checkpoints["llava"]), LlavaFrameProcessor)


def test_an_unknown_family_is_one_line_naming_the_supported(tmp_path):
    from pipeline.model_source import check_model

    (tmp_path / "config.json").write_text('{"model_type": "mystery_vlm"}')
    with pytest.raises(ValueError) as excinfo:
        check_model(str(tmp_path), "image")
    message = str(excinfo.value)
    assert "\n" not in message and "'mystery_vlm' is not supported" in message
    assert all(family in message for family in ("qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision"))


@pytest.mark.slow
def test_the_image_job_runs_on_llava(tmp_path, tiny_checkpoints, capsys):
    import ray

    from pipeline.cli import main

    rng = np.random.default_rng(5)
    ids = [f"img-{i}" for i in range(6)] + ["broken"]
    images = [_png(random_image(rng, 48 + 8 * i, 64)) for i in range(6)] + [b"\x00not an image"]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "image": images}), source)
    out = tmp_path / "out"
    argv = ["--model", tiny_checkpoints["llava"], "--input", str(source), "--output", str(out), "--max-new-tokens",
            "4", "--batch-size", "4", "--sparsity", "sparsevlm-r0.5"]
    try:
        assert main("image", "test", base={"generation": {"task": "caption"}}, argv=argv) == 0
        assert main("video", "test", base={"generation": {"task": "caption"}},
                    argv=[*argv[:4], "--output", str(tmp_path / "video")]) == 2
        assert "llava models take images only" in capsys.readouterr().err
    finally:
        ray.shutdown()
    rows = {row["id"]: row for row in pads.dataset(str(out), format="parquet").to_table().to_pylist()}
    assert sorted(rows) == sorted(ids)
    assert "not an image" in rows["broken"]["error"]
    for row_id in ids[:-1]:
        row = rows[row_id]
        assert row["error"] is None and row["n_generated_tokens"] >= 1, row
        assert row["n_visual_tokens"] == 16 and row["n_visual_tokens_kept"] < 16


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
