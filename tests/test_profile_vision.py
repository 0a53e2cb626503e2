"""The vision profile's FLOP count (benchmarks/profile_vision.py): torch's FlopCounterMode over the
model's own tower, checked against Qwen2.5-VL's tower written out by hand, and counting every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.profile_vision import tower_work
from helpers import chat, random_image
from sparsevlm import VLMEngine


def qwen2_5_vl_tower_flops(vision, patches: int, windows: list[int], images: list[int]) -> int:
    """Patch embedding, 32 (here: depth) blocks of qkv, proj, SwiGLU MLP and attention within windows
    (or whole images), and the merger's two linears, by hand."""
    d, mlp = vision.hidden_size, vision.intermediate_size
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    total = 2 * patches * patch * d
    for block in range(vision.depth):
        spans = images if block in vision.fullatt_block_indexes else windows
        total += 2 * patches * (4 * d * d + 3 * d * mlp) + sum(4 * span * span * d for span in spans)
    merged, width = patches // vision.spatial_merge_size ** 2, d * vision.spatial_merge_size ** 2
    return total + 2 * merged * (width * width + width * vision.out_hidden_size)


def one_image_sample(processor, height: int, width: int) -> dict:
    image = random_image(np.random.default_rng(0), height, width)
    return processor(text=[chat(processor, "image", text="What is in the picture?")], images=[image])


def test_the_count_is_qwen2_5_vl_s_tower_by_hand(tiny_checkpoints):
    engine = VLMEngine.from_pretrained(tiny_checkpoints["qwen2_5_vl"], dtype=torch.float32, device="cpu")
    sample = one_image_sample(engine.processor, 140, 196)  # 10 x 14 patches: some windows cut at the edges
    flops, patches = tower_work(engine.model, engine.processor, sample)
    vision = engine.model.config.vision_config
    # windows tile the grid of merged cells, window_size // merge // patch cells a side, the last ones cut
    _, rows, cols = (int(n) // vision.spatial_merge_size for n in sample["image_grid_thw"][0])
    side = vision.window_size // vision.spatial_merge_size // vision.patch_size
    windows = [min(side, rows - r) * min(side, cols - c) * vision.spatial_merge_size ** 2
               for r in range(0, rows, side) for c in range(0, cols, side)]
    assert patches == int(sample["image_grid_thw"].prod()) == sum(windows) and len(set(windows)) > 1
    assert flops == qwen2_5_vl_tower_flops(vision, patches, windows, [patches])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava", "llava_onevision"])
def test_every_family_s_tower_is_counted_and_grows_with_the_image(tiny_checkpoints, family):
    engine = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.float32, device="cpu")
    small, large = (tower_work(engine.model, engine.processor, one_image_sample(engine.processor, h, w))
                    for h, w in ((40, 40), (256, 320)))
    assert small[0] > 0 and small[1] > 0
    if family == "llava":  # every image resized to the tower's one size
        assert large == small
    else:
        assert large[0] > small[0] and large[1] > small[1]
