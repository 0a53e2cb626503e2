"""Our torchvision-free Qwen-VL preprocessing against transformers' processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import chat, random_image
from sparsevlm.preprocess import QwenVLProcessor, patchify, smart_resize


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def checkpoint(request, tiny_checkpoints):
    return tiny_checkpoints[request.param]


@pytest.mark.parametrize("size", [(28, 28), (50, 70), (123, 301), (224, 224), (600, 90), (1000, 999)])
def test_image_equals_transformers_pil_processor(checkpoint, size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image = random_image(np.random.default_rng(sum(size)), *size)
    reference = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)(images=[image], return_tensors="pt")
    processor = QwenVLProcessor.from_pretrained(checkpoint)
    ours = processor(text=[chat(processor, "image", text="hi")], images=[image])
    assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])  # bit-exact


def test_rgba_and_grayscale_become_rgb(checkpoint):
    processor = QwenVLProcessor.from_pretrained(checkpoint)
    rgba = np.random.default_rng(0).integers(0, 256, (40, 40, 4), dtype=np.uint8)
    out = processor(text=[chat(processor, "image", text="x")], images=[rgba])
    patch = processor.image_cfg.patch_size
    assert out["pixel_values"].shape[-1] == 3 * 2 * patch * patch


def test_pad_tokens_expand_to_grid(checkpoint):
    processor = QwenVLProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(1)
    images = [random_image(rng, 100, 60), random_image(rng, 30, 200)]
    frames = [random_image(rng, 64, 90) for _ in range(5)]
    prompt = chat(processor, "image", "video", "image", text="what?")
    out = processor(text=[prompt], images=images, videos=[frames])
    ids = out["input_ids"][0]
    assert (ids == processor.image_token_id).sum() == int(out["image_grid_thw"].prod(-1).sum()) // 4
    assert (ids == processor.video_token_id).sum() == int(out["video_grid_thw"].prod(-1).sum()) // 4
    assert out["video_grid_thw"][0, 0] == 3  # 5 frames padded to 6, two per temporal patch
    assert torch.equal(out["mm_token_type_ids"][0] == 1, ids == processor.image_token_id)
    assert torch.equal(out["mm_token_type_ids"][0] == 2, ids == processor.video_token_id)
    if processor.with_second_per_grid_ts:
        assert out["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per patch at 2 fps


def test_pad_token_count_mismatch_is_explained(checkpoint):
    processor = QwenVLProcessor.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> token\\(s\\) but 2 image"):
        processor(text=[chat(processor, "image", text="x")], images=[random_image(np.random.default_rng(0), 30, 30)] * 2)


def test_patchify_matches_naive_per_patch_loop():
    from sparsevlm.preprocess import VisionPreprocessConfig

    cfg = VisionPreprocessConfig(min_pixels=1, max_pixels=10**9, patch_size=2, temporal_patch_size=2, merge_size=2)
    frames = np.random.default_rng(0).normal(size=(3, 3, 8, 12)).astype(np.float32)
    patches, (gt, gh, gw) = patchify(frames, cfg)
    padded = np.concatenate([frames, frames[-1:]])
    expected = []
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        h, w = (bh * 2 + mh) * 2, (bw * 2 + mw) * 2
                        block = padded[2 * t:2 * t + 2, :, h:h + 2, w:w + 2]  # tp, C, p, p
                        expected.append(block.transpose(1, 0, 2, 3).reshape(-1))
    assert (gt, gh, gw) == (2, 4, 6)
    np.testing.assert_array_equal(patches, np.stack(expected))


def test_smart_resize_bounds():
    for h, w in [(10, 10), (5000, 3000), (28, 2000), (333, 777)]:
        rh, rw = smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280)
        assert rh % 28 == 0 and rw % 28 == 0 and 56 * 56 <= rh * rw <= 28 * 28 * 1280
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500, 28, 56 * 56, 28 * 28 * 1280)


def test_equals_transformers_processor_with_torchvision(checkpoint):
    """Runs where torchvision exists (the GPU machine): the full AutoProcessor, images and video."""
    pytest.importorskip("torchvision", reason="transformers' Qwen-VL processor needs torchvision")
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    reference_processor = AutoProcessor.from_pretrained(checkpoint)
    processor = QwenVLProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(3)
    images = [random_image(rng, 120, 90), random_image(rng, 64, 300)]
    frames = np.stack([np.asarray(random_image(rng, 80, 110)) for _ in range(4)])
    prompt = chat(processor, "image", "video", "image", text="Describe.")
    ours = processor(text=[prompt], images=images, videos=[frames], video_fps=2.0)
    metadata = VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])
    reference = reference_processor(text=[prompt], images=images, videos=[frames], return_tensors="pt",
                                    video_metadata=[metadata], do_sample_frames=False)
    if processor.timestamped_videos:  # transformers 5 keeps the template's pair around the timestamped groups
        reference = _without_outer_video_pair(reference, processor.tokenizer)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"):
        assert torch.equal(ours[key], reference[key].to(ours[key].dtype)), key
    # torchvision's bicubic resize rounds differently from PIL's: compare in pixel units (1/255 before normalisation)
    std = torch.tensor(processor.image_cfg.image_std).min().item()
    for key in ("pixel_values", "pixel_values_videos"):
        diff = (ours[key] - reference[key]).abs() * std * 255
        assert diff.mean() < 1.0 and diff.max() < 16, (key, diff.mean().item(), diff.max().item())
    if "second_per_grid_ts" in reference:
        assert torch.allclose(ours["second_per_grid_ts"], torch.as_tensor(reference["second_per_grid_ts"]).float())


def _without_outer_video_pair(reference: dict, tokenizer) -> dict:
    """Qwen3-VL: transformers 5.x writes <|vision_start|><t seconds><|vision_start|>...<|vision_end|>
    <|vision_end|>; Qwen's own processor (transformers 4.57, qwen-vl-utils) replaces the template's
    pair, as ours does. Drop the outer pair from the reference (the rest must match exactly)."""
    start, end = tokenizer.convert_tokens_to_ids("<|vision_start|>"), tokenizer.convert_tokens_to_ids("<|vision_end|>")
    ids = reference["input_ids"][0].tolist()
    video = (reference["mm_token_type_ids"][0] == 2).nonzero()[:, 0]
    first, last = int(video[0]), int(video[-1])
    outer_start = max(i for i in range(first - 1) if ids[i] == start)  # before the first "<t seconds>"
    assert ids[first - 1] == start and ids[last + 1] == end and ids[last + 2] == end
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[[outer_start, last + 2]] = False
    return {key: value[:, keep] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
            for key, value in reference.items()}
