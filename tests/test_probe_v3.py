"""Probe v3's training pieces on CPU: each question's tokens as the engine's processor builds
them, the packed scene layout, and the packed (tree-masked) forward against each question alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks import probe_v3, scenes
from sparsevlm.adapters.llava import LlavaFrameProcessor
from sparsevlm.tiny import build_tokenizer

# Issue 18's bar: the probe answers at least 90% of fresh scenes. The committed probe answers 59
# of these 60 on CPU in fp32 (0.983); this fails below 54 of 60.
PROBE_V3_FLOOR = 0.90


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer(family="qwen2_5_vl")
    tokenizer.add_special_tokens({"additional_special_tokens": [probe_v3.IMAGE_TOKEN]})
    tokenizer.chat_template = probe_v3.CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def stream(tokenizer):
    return probe_v3.SceneQuestions(tokenizer, seed=3, questions=4)


@pytest.fixture(scope="module")
def batch(stream, tokenizer):
    examples = list(itertools.islice(iter(stream), 3))
    return examples, probe_v3.collate(examples, pad_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def test_each_question_alone_is_what_the_engines_processor_builds(tmp_path, tokenizer, stream):
    probe_v3.write_processor_files(tmp_path, tokenizer)
    processor = LlavaFrameProcessor.from_pretrained(tmp_path)
    asked = scenes.scene_questions(__import__("random").Random(5))[:4]
    example = stream.encode(asked)
    for sample, (ids, labels) in zip(asked, probe_v3.lone_sequences(example)):
        content = [{"type": "image"}, {"type": "text", "text": sample.question + scenes.PROMPT_SUFFIX}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}])
        engine = processor(text=[prompt], images=[sample.media], return_frames=True)
        answer = tokenizer.encode(sample.answer + "<|im_end|>", add_special_tokens=False)
        assert ids == engine["input_ids"][0].tolist() + answer
        assert [t for t in labels if t != -100] == answer
        assert torch.equal(engine["image_frames"][0][0].permute(2, 0, 1), torch.from_numpy(example["pixels"]))


def test_a_packed_scene_holds_576_visual_tokens_once_and_every_answer(tokenizer, batch):
    examples, collated = batch
    image = tokenizer.convert_tokens_to_ids(probe_v3.IMAGE_TOKEN)
    assert collated["pixels"].shape == (3, 3, 336, 336) and collated["pixels"].dtype == torch.uint8
    assert collated["regions"].shape == (3, 3, 576)
    for row, example in enumerate(examples):
        assert (collated["input_ids"][row] == image).sum() == 576
        assert max(example["branch"]) > 1  # several questions share the image
        learned = collated["labels"][row][collated["labels"][row] != -100].tolist()
        assert learned == [t for _, labels in probe_v3.lone_sequences(example) for t in labels if t != -100]
        for number in range(1, max(example["branch"]) + 1):  # each branch starts right after the prefix
            at = collated["branch"][row] == number
            prefix = int((collated["branch"][row] == 0).sum())
            assert collated["position_ids"][row][at].tolist() == list(range(prefix, prefix + int(at.sum())))
    assert (collated["branch"] == -1).any(), "the batch should hold padding"


def test_packed_logits_equal_each_question_alone(tokenizer, batch):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    examples, collated = batch
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer))
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=336, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=-1,
                         image_token_id=tokenizer.convert_tokens_to_ids(probe_v3.IMAGE_TOKEN))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    pixels = torch.rand(collated["pixels"].shape)  # fresh features: nothing hides a mixed-up row
    with torch.no_grad():
        features = probe_v3.image_features(model, pixels)
        packed = probe_v3.answer_logits(model, features, collated)
        alone = []  # the reference: transformers' own LLaVA forward on each question alone
        for row, example in enumerate(examples):
            for ids, labels in probe_v3.lone_sequences(example):
                logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels[row:row + 1]).logits[0, :-1]
                alone.append(logits[torch.tensor(labels[1:]) != -100])
    assert features.shape == (3, 576, 64)
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-4)  # fp32, other summation orders


@pytest.mark.slow
def test_the_assembled_probe_answers_fresh_scenes(tmp_path):
    """The committed parts plus the wheel's SmolLM2, assembled as a user assembles them, answer a
    fixed subset of a seed they never trained on, on CPU in fp32 (H200 bf16 on 400 scenes of the
    same seed: 0.990; benchmarks/results/h200_probe_v3_accuracy.json)."""
    from benchmarks import accuracy
    from sparsevlm import SparsityConfig, VLMEngine

    assert (probe_v3.PARTS / "adapter_model.safetensors").stat().st_size <= 25 * 10**6
    model = probe_v3.assemble(tmp_path / "probe-v3")
    engine = VLMEngine.from_pretrained(str(model), dtype=torch.float32, device="cpu")
    assert engine.adapter.num_layers == 30
    result = accuracy.run(engine, seed=11, n=60, sparsity=SparsityConfig(method="none"), qtypes=scenes.IMAGE_TYPES,
                          batch_size=20)
    print(result)
    assert result["n"] == 60 and set(result["by_type"]) == set(scenes.IMAGE_TYPES)
    assert result["accuracy"] >= PROBE_V3_FLOOR, result
