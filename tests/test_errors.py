"""Bad inputs fail with one line that names the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import mixed_samples
from sparsevlm import VLMEngine
from sparsevlm.preprocess import QwenVLProcessor


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unknown_model_family(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        VLMEngine.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert "'llama' is not supported" in one_line(excinfo) and "adapter" in str(excinfo.value)


def test_sample_without_input_ids(engine):
    sample = dict(mixed_samples(engine.processor)[0])
    del sample["input_ids"]
    with pytest.raises(ValueError) as excinfo:
        engine.generate([sample])
    assert "sample 0 has no input_ids" in one_line(excinfo)


def test_image_pad_count_must_match_grid(engine):
    sample = dict(mixed_samples(engine.processor)[0])
    ids = sample["input_ids"]
    pad = engine.model.config.image_token_id
    first = int((ids[0] == pad).nonzero()[0])
    sample["input_ids"] = torch.cat([ids[:, :first], ids[:, first + 1:]], dim=1)  # one pad token fewer
    sample["attention_mask"] = torch.ones_like(sample["input_ids"])
    with pytest.raises(ValueError) as excinfo:
        engine.generate([sample])
    assert "image pad tokens in input_ids but image_grid_thw implies" in one_line(excinfo)
    assert "build the prompt with the processor" in str(excinfo.value)


def test_processor_from_another_model(engine, tmp_path):
    from sparsevlm.tiny import SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    shuffled = tokenizer.__class__(tokenizer_object=_reordered_specials(SPECIAL_TOKENS))
    foreign = QwenVLProcessor(shuffled, engine.processor.image_cfg, engine.processor.video_cfg, False)
    with pytest.raises(ValueError) as excinfo:
        VLMEngine(engine.model, foreign)
    assert "different checkpoints" in one_line(excinfo)


def _reordered_specials(specials):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(list(reversed(specials)))
    return tok


def test_pixel_values_of_another_vision_tower(engine):
    sample = dict(mixed_samples(engine.processor)[0])
    sample["pixel_values"] = sample["pixel_values"][:, :-3]
    with pytest.raises(ValueError) as excinfo:
        engine.generate([sample])
    assert "processor does not belong to this model" in one_line(excinfo)


def test_sampling_params_are_validated():
    from sparsevlm import SamplingParams

    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(SamplingParams(), top_p=0.0)


def test_a_tower_that_returns_too_few_rows_fails_clearly(engine, monkeypatch):
    """An adapter out of step with the library's feature layout (a newline row moved between
    versions, say) is a one-line error, checked on shapes before the embedding scatter: on CUDA
    the scatter itself would raise a device-side assert and break the GPU context."""
    original = type(engine.adapter).encode_visual

    def one_row_short(self, samples, backend):
        features = original(self, samples, backend)
        features.by_token_id = {token: rows[:-1] for token, rows in features.by_token_id.items()}
        return features

    monkeypatch.setattr(type(engine.adapter), "encode_visual", one_row_short)
    with pytest.raises(RuntimeError) as excinfo:
        engine.generate(mixed_samples(engine.processor)[:1])
    assert "feature rows for" in one_line(excinfo) and "transformers" in str(excinfo.value)
