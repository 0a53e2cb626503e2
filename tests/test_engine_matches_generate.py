"""The engine against transformers' `model.generate`, sample by sample (CPU, fp32, greedy)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparsevlm import EngineConfig, SamplingParams, VLMEngine

from helpers import mixed_samples

MAX_NEW = [5, 9, 7, 12, 3, 1, 8, 6]


def reference_tokens(engine, sample: dict, max_new_tokens: int) -> list[int]:
    out = engine.model.generate(**sample, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, sample["input_ids"].shape[1]:].tolist()



@pytest.fixture(scope="module")
def engine(any_engine):
    """Every family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-1.5 and LLaVA-OneVision."""
    return any_engine


@pytest.fixture(scope="module")
def cases(engine):
    samples = mixed_samples(engine.processor)
    params = [SamplingParams(max_new_tokens=n) for n in MAX_NEW]
    references = [reference_tokens(engine, s, p.max_new_tokens) for s, p in zip(samples, params)]
    return samples, params, references


def test_batch_equals_generate_sample_by_sample(engine, cases):
    samples, params, references = cases
    results = engine.generate(samples, params)
    for i, (result, reference) in enumerate(zip(results, references)):
        assert result.token_ids == reference, f"sample {i}"
        assert result.text == engine.processor.decode(reference, skip_special_tokens=True)
        assert result.stats.n_generated_tokens == len(reference)
        assert result.stats.n_prompt_tokens == samples[i]["input_ids"].shape[1]


@pytest.mark.parametrize("engine_config", [
    EngineConfig(max_prefill_tokens=100),  # packs split inside a batch
    EngineConfig(max_num_seqs=3),  # several batches
    EngineConfig(max_prefill_tokens=1, max_num_seqs=1),  # every sample alone
    EngineConfig(max_cache_tokens=250),  # batches bounded by KV memory
], ids=["small-packs", "small-batches", "alone", "small-cache"])
def test_output_does_not_depend_on_batching(engine, cases, engine_config):
    samples, params, references = cases
    split_engine = VLMEngine(engine.model, engine.processor, engine_config=engine_config)
    # reversed order changes every sample's batch mates and pack position
    order = list(reversed(range(len(samples))))
    results = split_engine.generate([samples[i] for i in order], [params[i] for i in order])
    for position, i in enumerate(order):
        assert results[position].token_ids == references[i], f"sample {i}"


def test_visual_token_counts(engine, cases):
    samples, params, _ = cases
    results = engine.generate(samples, params)
    vision = engine.model.config.vision_config
    for sample, result in zip(samples, results):
        if hasattr(vision, "spatial_merge_size"):  # Qwen-VL: a token per merged group of the grid
            grids = [sample[k] for k in ("image_grid_thw", "video_grid_thw") if k in sample]
            expected = sum(int(g.prod(-1).sum()) for g in grids) // vision.spatial_merge_size ** 2
        elif engine.model.config.model_type == "llava":  # a token per patch of the tower's square input
            expected = len(sample.get("pixel_values", ())) * (vision.image_size // vision.patch_size) ** 2
        else:  # OneVision: tiles, unpadding, newlines and pooling, as the model's own feature code counts them
            expected = onevision_feature_rows(engine.model, sample)
        assert result.stats.n_visual_tokens == expected


def onevision_feature_rows(model, sample: dict) -> int:
    """Rows of visual features transformers' LLaVA-OneVision makes of a sample: its placeholders,
    once the model's own forward has accepted them (it checks every image's and video's features
    against its placeholders, tiles, unpadding, newlines and pooling included, and raises on a
    mismatch; where the newline after a video is added moved between transformers versions)."""
    config = model.config
    with torch.no_grad():
        model(**sample)
    return int(((sample["input_ids"] == config.image_token_id) | (sample["input_ids"] == config.video_token_id)).sum())


def test_stop_token_ends_generation(engine, cases):
    samples, params, references = cases
    i = max(range(len(samples)), key=lambda j: len(set(references[j])))  # the most varied output
    stop = references[i][2]
    result = engine.generate([samples[i]], dataclasses.replace(params[i], stop_token_ids=(stop,)))[0]
    assert result.token_ids == references[i][:references[i].index(stop) + 1]
    assert result.stats.finish_reason == "stop"


def test_seeded_sampling_is_batch_invariant(engine, cases):
    samples, _, _ = cases
    params = [SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.95, top_k=50, seed=100 + i)
              for i in range(len(samples))]
    together = engine.generate(samples, params)
    for i in (0, 3, 6):
        alone = engine.generate([samples[i]], params[i])[0]
        assert alone.token_ids == together[i].token_ids
    assert len({tuple(r.token_ids) for r in together}) > 1
