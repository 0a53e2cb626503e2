"""Qwen3-VL specifics (exactness and pruning run for it in test_engine_matches_generate and
test_sparse_engine): interleaved M-RoPE tables, timestamped videos, frames, DeepStack under pruning."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from sparsevlm import SamplingParams, SparsityConfig, VLMEngine
from sparsevlm.preprocess import frame_group_times

from helpers import chat, random_image


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoints) -> VLMEngine:
    return VLMEngine.from_pretrained(tiny_checkpoints["qwen3_vl"], dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision"])
def test_rope_tables_are_the_rotation_the_model_applies(tiny_checkpoints, family):
    """SparseVLM+'s prior is built from `rope_tables`: frequency i turns with position component
    sections[i]. Checked against the model's own rotary on random 3-D positions."""
    engine = VLMEngine.from_pretrained(tiny_checkpoints[family], dtype=torch.float32, device="cpu")
    adapter = engine.adapter
    inv_freq, sections = adapter.rope_tables()
    components = 1 if family.startswith("llava") else 3
    positions = torch.randint(0, 200, (components, 50))
    cos, _ = adapter.rotary(torch.zeros(1, 50, adapter.text_config.hidden_size), positions)
    expected = torch.cos(positions[sections].T.float() * inv_freq)  # T, D/2
    torch.testing.assert_close(cos[0, :, :inv_freq.shape[0]], expected, rtol=1e-5, atol=1e-5)


def test_each_frame_group_of_a_video_has_its_timestamp(qwen3):
    processor = qwen3.processor
    rng = np.random.default_rng(1)
    video = [random_image(rng, 64, 96) for _ in range(5)]  # odd: the last frame is repeated
    sample = processor(text=[chat(processor, "video", text="Caption the video.")], videos=[video], video_fps=2.0)
    text = processor.tokenizer.decode(sample["input_ids"][0])
    t, h, w = sample["video_grid_thw"][0].tolist()
    assert t == 3 and frame_group_times(5, 2.0, 2) == [0.25, 1.25, 2.0]
    spans = re.findall(r"<([0-9.]+) seconds><\|vision_start\|>((?:<\|video_pad\|>)+)<\|vision_end\|>", text)
    assert [float(s) for s, _ in spans] == [0.2, 1.2, 2.0]  # "%.1f", as transformers writes them
    assert all(pads.count("<|video_pad|>") == h * w // 4 for _, pads in spans)
    assert text.count("<|vision_start|>") == 3  # the template's own pair became the first group's


def test_frames_are_normalised_on_the_device_as_the_processor_does(qwen3):
    processor = qwen3.processor
    rng = np.random.default_rng(4)
    images, video = [random_image(rng, 100, 70)], [random_image(rng, 90, 120) for _ in range(3)]
    prompt = chat(processor, "image", "video", text="Compare them.")
    patches = processor(text=[prompt], images=images, videos=[video])
    frames = processor(text=[prompt], images=images, videos=[video], return_frames=True)
    prepared = qwen3.prepare(frames)
    for kind, pixel_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        assert torch.equal(qwen3.adapter._patches(prepared, pixel_key, kind), patches[pixel_key])  # bit for bit


def test_deepstack_after_an_early_prune_reaches_the_kept_tokens(qwen3):
    """Prune after layer 0 (before DeepStack's layer 1): a naive per-sample forward through the
    model's own layers, dropping the pruned rows and adding layer 1's DeepStack features to the
    kept ones by their original index, gives the engine's first token."""
    processor = qwen3.processor
    rng = np.random.default_rng(9)
    samples = [processor(text=[chat(processor, "image", text=q)], images=[random_image(rng, 96, 128)])
               for q in ("What is in the picture?", "Read the sign.")]
    sparsity = SparsityConfig(method="sparsevlm", schedule={0: 0.5}, recycle=False)
    results = qwen3.generate(samples, SamplingParams(max_new_tokens=1), sparsity=sparsity)
    adapter, model = qwen3.adapter, qwen3.model
    assert len(model.config.vision_config.deepstack_visual_indexes) == 2
    with torch.no_grad():
        for sample, result in zip(samples, results):
            ids = sample["input_ids"][0]
            vision = model.model.get_image_features(sample["pixel_values"], sample["image_grid_thw"])
            embeds = torch.cat(vision.pooler_output)
            deepstack = [layer if torch.is_tensor(layer) else torch.cat(layer)  # split per image since 5.2x
                         for layer in vision.deepstack_features]
            visual = ids == model.config.image_token_id
            hidden = adapter.embed_tokens(ids).masked_scatter(visual[:, None], embeds)
            positions, _ = model.model.get_rope_index(ids[None], sample["mm_token_type_ids"],
                                                      image_grid_thw=sample["image_grid_thw"])
            positions = positions[:, 0]
            hidden = _layer(adapter, 0, hidden, positions)
            hidden[visual] += deepstack[0]
            kept = torch.tensor(result.stats.kept_visual_positions)
            assert 0 < len(kept) < int(visual.sum())
            visual_rows = torch.nonzero(visual)[:, 0]
            keep_rows = torch.ones_like(visual)
            keep_rows[visual_rows] = False
            keep_rows[visual_rows[kept]] = True
            hidden, positions = hidden[keep_rows], positions[:, keep_rows]
            hidden = _layer(adapter, 1, hidden, positions)
            hidden[visual[keep_rows]] += deepstack[1][kept]
            for index in range(2, adapter.num_layers):
                hidden = _layer(adapter, index, hidden, positions)
            logits = adapter.lm_head(adapter.norm(hidden[-1]))
            assert result.token_ids[0] == int(logits.argmax())


def _layer(adapter, index: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    rotary = adapter.rotary(hidden[None], positions)
    return adapter.layers[index](hidden[None], attention_mask=None, position_embeddings=rotary)[0]


@pytest.mark.slow
def test_the_video_job_runs_on_qwen3_vl(tmp_path, tiny_checkpoints):
    """Timestamped prompts, clip-wide resize and DeepStack through the pipeline's columns."""
    import pyarrow.dataset as pads
    import ray

    from pipeline.cli import main

    argv = ["--model", tiny_checkpoints["qwen3_vl"], "--output", str(tmp_path / "out"), "--max-new-tokens", "4",
            "--batch-size", "4", "--num-frames", "4", "--sparsity", "sparsevlm-r0.5"]
    try:
        assert main("video", "test", base={"generation": {"task": "caption"}}, argv=argv) == 0
    finally:
        ray.shutdown()
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert rows and all(r["error"] is None and r["n_generated_tokens"] >= 1 for r in rows), rows
    assert all(0 < r["n_visual_tokens_kept"] < r["n_visual_tokens"] for r in rows)
