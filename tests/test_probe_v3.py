"""Probe v3's training pieces on CPU: the examples as the engine's processor builds them, the
batch layout, and the unmasked right-padded loss against the masked reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks import probe_v3
from sparsevlm.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer(family="qwen2_5_vl")
    tokenizer.add_special_tokens({"additional_special_tokens": [probe_v3.IMAGE_TOKEN]})
    tokenizer.chat_template = probe_v3.CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def batch(tokenizer):
    examples = list(itertools.islice(iter(probe_v3.SceneQuestions(tokenizer, seed=3, questions=3)), 2))
    return examples, probe_v3.collate(examples, pad_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def test_examples_hold_576_visual_tokens_and_their_answers(tokenizer, batch):
    examples, collated = batch
    image = tokenizer.convert_tokens_to_ids(probe_v3.IMAGE_TOKEN)
    assert collated["pixels"].shape == (2, 3, 336, 336) and collated["pixels"].dtype == torch.uint8
    assert collated["regions"].shape == (3, 2, 576)
    rows = [(i, p, a) for i, e in enumerate(examples) for p, a in e["sequences"]]
    assert collated["scene"].tolist() == [i for i, _, _ in rows]
    for row, (_, prompt, answer) in enumerate(rows):
        assert (collated["input_ids"][row] == image).sum() == 576
        labelled = collated["labels"][row] != -100
        assert collated["labels"][row][labelled].tolist() == answer
        assert int(labelled.nonzero()[0]) == len(prompt)  # the answer follows the prompt
        assert collated["attention_mask"][row].sum() == len(prompt) + len(answer)
        assert tokenizer.decode(answer).endswith("<|im_end|>")


def test_the_unmasked_right_padded_loss_equals_the_masked_one(tokenizer, batch):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    _, collated = batch
    assert (collated["attention_mask"] == 0).any(), "the batch should hold padding"
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer))
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=336, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=-1,
                         image_token_id=tokenizer.convert_tokens_to_ids(probe_v3.IMAGE_TOKEN))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    pixels = collated["pixels"].float() / 255
    with torch.no_grad():
        unmasked, features = probe_v3.losses_of(model, pixels, collated)
        masked, _ = probe_v3.losses_of(model, pixels, collated, padding_mask=True)
    assert features.shape == (2, 576, 64)
    torch.testing.assert_close(unmasked, masked, rtol=1e-5, atol=1e-5)
