"""Each family's token layout (what the cost report's gallery draws): the first rows x columns
visual tokens of an image tile the frame as the tower sees it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsevlm import VLMEngine

from helpers import chat, random_image


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision"])
@pytest.mark.parametrize("size", [(90, 160), (200, 70)])
def test_the_first_token_grid_covers_the_first_image(tiny_checkpoints, family, size):
    engine = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.float32, device="cpu")
    processor, adapter = engine.processor, engine.adapter
    frame = random_image(np.random.default_rng(size[0]), *size)
    image, rows, columns = adapter.first_token_grid(processor, frame, "image")
    sample = processor(text=[chat(processor, "image", text="Where?")], images=[frame])
    tokens = int(engine.prepare(sample).num_visual_tokens)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    if family.startswith("qwen"):  # the whole image is the grid, a token per merged cell
        assert rows * columns == tokens and image.shape[0] * columns == image.shape[1] * rows
    elif family == "llava":  # the centre crop, a token per patch
        assert rows * columns == tokens == 16 and image.shape[:2] == (56, 56)
    else:  # OneVision: the base tile first, then the tiles and newlines
        assert rows * columns == 16 < tokens and image.shape[:2] == (56, 56)
