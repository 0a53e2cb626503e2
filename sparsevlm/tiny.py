"""Tiny checkpoints of every supported family, built offline, for tests, demos and CPU benchmarks.

A checkpoint is written exactly like a hub one (`save_pretrained` safetensors, tokenizer
with chat template, preprocessor configs), so everything downstream goes through the
real `from_pretrained` path. The tokenizer is a real byte-level BPE trained here on a
small built-in corpus; weights are random (seeded).

    python -m sparsevlm.tiny qwen2_5_vl /tmp/tiny-qwen25
    python -m sparsevlm.tiny llava /tmp/tiny-llava      # LLaVA-1.5: CLIP tower, Llama decoder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# LLaVA-1.5's prompt format (llava-hf's template): "USER: <image>\n<question> ASSISTANT:"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
# LLaVA-OneVision (Qwen2 decoder): ChatML, the visual tokens first in the user turn
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION_TILE = 56  # 4x4 patches of 14 per tile (the real model: 384, 27x27)
ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
LLAVA_IMAGE_SIZE = 56  # 4x4 patches of 14: 16 visual tokens per image (the real model: 336, 576)

_CORPUS = """
You are a helpful assistant. Describe this image. What is in the picture? Answer with one word.
What colour is the car on the left? How many people are in the photo? Is there a dog? Read the sign.
A red square, a blue circle and a green triangle on a grey background. The cat sits on the mat.
Caption the video. What happens after the ball falls? Which object moves first? yes no left right
one two three four five six seven eight nine ten small large big tiny bright dark street park
kitchen table chair window door tree sky water road building person man woman child bird horse
"""

# Shared by both families: what makes the model tiny.
TEXT_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)
MROPE_SECTION = [2, 3, 3]  # sums to head_dim / 2 = 8
PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # 4..64 visual tokens per image
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_onevision")
QWEN3_PIXELS = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)  # patch 16, merge 2: 4..64 tokens per image
QWEN3_VIDEO_PIXELS = dict(min_pixels=32 * 32 * 8, max_pixels=32 * 32 * 256)  # for the whole clip (T x H x W)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None, family: str = "qwen2_5_vl"):
    """A byte-level BPE with the family's special tokens and chat template, trained on `corpus` lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    llava = family == "llava"
    specials = LLAVA_SPECIAL_TOKENS if llava else SPECIAL_TOKENS + (["<image>", "<video>"] if family ==
                                                                   "llava_onevision" else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus or _CORPUS.split("\n"), trainer)
    if llava:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>",
                                       pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                       chat_template=LLAVA_CHAT_TEMPLATE)
    template = ONEVISION_CHAT_TEMPLATE if family == "llava_onevision" else QWEN_VL_CHAT_TEMPLATE
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template)


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The Qwen-VL config's special-token fields, read from a tokenizer with Qwen's special tokens."""
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}


def _llava_config(tokenizer, initializer_range: float):
    from transformers import LlavaConfig

    eos = [tokenizer.convert_tokens_to_ids("</s>")]
    pad, bos = tokenizer.convert_tokens_to_ids("<pad>"), tokenizer.convert_tokens_to_ids("<s>")
    text = dict(TEXT_DIMS, model_type="llama", vocab_size=len(tokenizer), initializer_range=initializer_range,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=eos[0],
                bos_token_id=bos, pad_token_id=pad)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, image_size=LLAVA_IMAGE_SIZE, patch_size=14, projection_dim=32,
                  initializer_range=initializer_range)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return config, eos


def _onevision_config(tokenizer, initializer_range: float):
    from transformers import LlavaOnevisionConfig

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    text = dict(TEXT_DIMS, model_type="qwen2", vocab_size=len(tokenizer), initializer_range=initializer_range,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=eos[0],
                bos_token_id=eos[1], pad_token_id=eos[1])
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=ONEVISION_TILE, patch_size=14)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision,
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=ONEVISION_PINPOINTS, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return config, eos


def write_onevision_processor_configs(path: Path, tile: int, pinpoints, num_image_tokens: int) -> None:
    """llava-hf's OneVision files: the any-resolution image processor, the video processor, the processor."""
    common = dict(do_resize=True, size={"height": tile, "width": tile}, resample=3, do_rescale=True,
                  rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  do_convert_rgb=True, processor_class="LlavaOnevisionProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(dict(
        common, image_processor_type="LlavaOnevisionImageProcessor", do_pad=True, image_grid_pinpoints=pinpoints),
        indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(dict(
        common, video_processor_type="LlavaOnevisionVideoProcessor"), indent=2))
    (path / "processor_config.json").write_text(json.dumps(dict(
        processor_class="LlavaOnevisionProcessor", num_image_tokens=num_image_tokens,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9"), indent=2))
    (path / "chat_template.jinja").write_text(ONEVISION_CHAT_TEMPLATE)


def write_llava_processor_configs(path: Path, image_size: int, chat_template: str = LLAVA_CHAT_TEMPLATE) -> None:
    """llava-hf's files: a CLIP-style image processor (shortest edge, centre crop) and the processor."""
    (path / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="LlavaImageProcessor", processor_class="LlavaProcessor", do_resize=True,
        size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True, do_pad=False), indent=2))
    (path / "processor_config.json").write_text(json.dumps(dict(
        processor_class="LlavaProcessor", patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>"), indent=2))
    (path / "chat_template.jinja").write_text(chat_template)


def _model_config(family: str, tokenizer, initializer_range: float):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family == "llava":
        return _llava_config(tokenizer, initializer_range)
    if family == "llava_onevision":
        return _onevision_config(tokenizer, initializer_range)
    ids = vision_token_ids(tokenizer)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    text = dict(TEXT_DIMS, vocab_size=len(tokenizer), initializer_range=initializer_range,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTION},
                eos_token_id=eos[0], bos_token_id=eos[1], pad_token_id=eos[1])
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=TEXT_DIMS["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=initializer_range)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids), eos
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=TEXT_DIMS["hidden_size"], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
                      initializer_range=initializer_range)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids), eos
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"])
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_DIMS["hidden_size"],
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1], initializer_range=initializer_range)
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids), eos
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def write_preprocessor_configs(path: Path, family: str, min_pixels: int, max_pixels: int,
                               video_pixels: dict | None = None) -> None:
    """The JSON files a hub checkpoint carries, in transformers' own format. `video_pixels`:
    the video processor's own bounds (Qwen3-VL: per clip), else the image ones."""
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                       "qwen3_vl": "Qwen3VLProcessor"}[family]
    qwen3 = family == "qwen3_vl"
    mean, std = ([0.5] * 3, [0.5] * 3) if qwen3 else (CLIP_MEAN, CLIP_STD)
    common = dict(do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                  image_mean=mean, image_std=std, patch_size=16 if qwen3 else 14, temporal_patch_size=2,
                  merge_size=2, resample=3, size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                  processor_class=processor_class)
    video = dict(common, video_processor_type="Qwen3VLVideoProcessor" if qwen3 else "Qwen2VLVideoProcessor",
                 do_sample_frames=False)
    if video_pixels:
        video["size"] = {"shortest_edge": video_pixels["min_pixels"], "longest_edge": video_pixels["max_pixels"]}
    (path / "preprocessor_config.json").write_text(
        json.dumps(dict(common, image_processor_type="Qwen2VLImageProcessor"), indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}, indent=2))
    (path / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)


def build_tiny_checkpoint(path: str | Path, family: str = "qwen2_5_vl", seed: int = 0,
                          initializer_range: float = 0.1) -> Path:
    """Write a random-weight tiny checkpoint of `family` to `path` and return the path.

    `initializer_range` is larger than a real model's so logits are peaked: greedy
    decoding then has no near-ties, which makes token-exact comparisons meaningful.
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family=family)
    config, eos = _model_config(family, tokenizer, initializer_range)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    text = config.get_text_config()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=text.pad_token_id,
                                               bos_token_id=text.bos_token_id, do_sample=False)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if family == "llava":
        write_llava_processor_configs(path, LLAVA_IMAGE_SIZE)
    elif family == "llava_onevision":
        write_onevision_processor_configs(path, ONEVISION_TILE, ONEVISION_PINPOINTS, (ONEVISION_TILE // 14) ** 2)
    elif family == "qwen3_vl":
        write_preprocessor_configs(path, family, **QWEN3_PIXELS, video_pixels=QWEN3_VIDEO_PIXELS)
    else:
        write_preprocessor_configs(path, family, **PIXELS)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=TINY_FAMILIES)
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_checkpoint(args.path, args.family, args.seed))


if __name__ == "__main__":
    main()
