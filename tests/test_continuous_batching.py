"""Continuous batching: samples arriving over time, few seats and little KV memory, still exact.

The reference for every sample is itself alone: `model.generate` for dense, the engine on
that one sample for pruned runs (CPU, fp32, greedy, both Qwen families).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import chat, mixed_samples, random_image
from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine

PRUNED = SparsityConfig(method="sparsevlm", keep_ratio=0.4)


def stream_samples(processor) -> list[dict]:
    """24 mixed samples (image sizes, two images, video, text only); every other one with its
    pixels as uint8 frames, normalised by the engine instead of the processor."""
    samples = []
    for seed in range(3):
        for i, sample in enumerate(mixed_samples(processor, seed=seed)):
            samples.append(_as_frames(processor, seed, i) if (seed + i) % 2 else sample)
    return samples


def _as_frames(processor, seed: int, index: int) -> dict:
    """The same sample as mixed_samples(seed)[index], built with return_frames=True."""
    return mixed_samples(_FramesProcessor(processor), seed=seed)[index]


class _FramesProcessor:
    """The processor, asked for uint8 frames instead of patches."""

    def __init__(self, processor):
        self.processor = processor

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *args, **kwargs):
        return self.processor(*args, return_frames=True, **kwargs)


@pytest.fixture(scope="module")
def stream(engine):
    rng = random.Random(3)
    samples = stream_samples(engine.processor)
    params = [SamplingParams(max_new_tokens=rng.randint(1, 40)) for _ in samples]
    return samples, params


def run_stream(engine: VLMEngine, samples, params, sparsity, seed: int = 0):
    """Add 0-2 samples before each step, in order; -> (results by sample index, saw KV-bound waiting)."""
    rng = random.Random(seed)
    ids, results, pending, kv_bound = {}, {}, list(range(len(samples))), False
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 2)):
            if pending:
                i = pending.pop(0)
                ids[engine.add_request(samples[i], params[i], sparsity)] = i
        scheduler = engine.scheduler
        kv_bound |= bool(scheduler.waiting) and len(scheduler.running) < scheduler.max_num_seqs
        for request_id, result in engine.step():
            assert result.error is None, result.error
            results[ids[request_id]] = result
    return results, kv_bound


def small_engine(engine) -> VLMEngine:
    # ~2 of the larger samples fit at once: admission waits on KV memory, not only on seats
    return VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(max_num_seqs=3,
                                                                                max_cache_tokens=400))


def test_stream_equals_generate_alone(engine, stream):
    samples, params = stream
    results, kv_bound = run_stream(small_engine(engine), samples, params, SparsityConfig())
    assert kv_bound, "the KV budget never made a sample wait; shrink it"
    for i, (sample, p) in enumerate(zip(samples, params)):
        reference = _generate_alone(engine.model, sample, engine.processor, p.max_new_tokens)
        assert results[i].token_ids == reference, f"sample {i}"


def test_pruned_stream_equals_pruned_alone(engine, stream):
    samples, params = stream
    results, _ = run_stream(small_engine(engine), samples, params, PRUNED, seed=1)
    pruned_any = False
    for i, (sample, p) in enumerate(zip(samples, params)):
        alone = engine.generate([sample], p, sparsity=PRUNED)[0]
        assert results[i].token_ids == alone.token_ids, f"sample {i}"
        assert results[i].stats.kept_visual_positions == alone.stats.kept_visual_positions, f"sample {i}"
        pruned_any |= alone.stats.n_visual_tokens_kept < alone.stats.n_visual_tokens
    assert pruned_any


def test_frames_are_normalised_on_the_device_as_the_processor_does(engine):
    rng = np.random.default_rng(4)
    processor = engine.processor
    images = [random_image(rng, 100, 70), random_image(rng, 56, 200)]
    video = [random_image(rng, 90, 120) for _ in range(3)]  # odd: the last frame is repeated
    prompt = chat(processor, "image", "image", "video", text="Compare them.")
    patches = processor(text=[prompt], images=images, videos=[video])
    frames = processor(text=[prompt], images=images, videos=[video], return_frames=True)
    assert "pixel_values" not in frames and frames["image_frames"][0].dtype == torch.uint8
    for key in ("input_ids", "image_grid_thw", "video_grid_thw", "mm_token_type_ids"):
        assert torch.equal(patches[key], frames[key])
    prepared = engine.prepare(frames)
    adapter = engine.adapter
    for kind, pixel_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        on_device = adapter._patches(prepared, pixel_key, kind)
        assert torch.equal(on_device, patches[pixel_key].to(on_device.dtype))  # bit for bit


def test_frames_that_do_not_match_their_grid_are_refused(engine):
    processor = engine.processor
    rng = np.random.default_rng(5)
    sample = processor(text=[chat(processor, "image", text="What?")], images=[random_image(rng, 64, 64)],
                       return_frames=True)
    sample["image_frames"] = [sample["image_frames"][0][:, :-14]]
    with pytest.raises(ValueError, match="do not match grid"):
        engine.generate([sample])


def _generate_alone(model, sample, processor, max_new_tokens: int) -> list[int]:
    if "image_frames" in sample or "video_frames" in sample:
        sample = _patches_form(sample, processor)
    out = model.generate(**sample, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, sample["input_ids"].shape[1]:].tolist()


def _patches_form(sample: dict, processor) -> dict:
    """What the processor would have returned without return_frames (transformers needs patches)."""
    from sparsevlm.preprocess import normalization_table, normalize_frames, patchify

    out = {k: v for k, v in sample.items() if not k.endswith("_frames")}
    for kind, key, cfg in (("image", "pixel_values", processor.image_cfg),
                           ("video", "pixel_values_videos", processor.video_cfg)):
        if f"{kind}_frames" in sample:
            table = normalization_table(cfg)
            out[key] = torch.from_numpy(np.concatenate(
                [patchify(normalize_frames(f.numpy(), table), cfg)[0] for f in sample[f"{kind}_frames"]]))
    return out
