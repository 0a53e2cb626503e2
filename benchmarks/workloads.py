"""Benchmark models and workloads (names and shapes from shared/design/BENCHMARKS.md).

Models: "tiny" (the offline test checkpoint, CPU, seconds), or the real architectures with
random bf16 weights, built directly on the GPU: "qwen2_5_vl_7b", "qwen3_vl_8b", "llava_1_5_7b",
"llava_onevision_7b".
All use our offline tokenizer of their family; the special-token ids are set to match it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparsevlm.adapters.llava import LlavaFrameProcessor
from sparsevlm.adapters.llava_onevision import OnevisionProcessor
from sparsevlm.preprocess import QwenVLProcessor
from sparsevlm.tiny import (
    build_tiny_checkpoint, build_tokenizer, vision_token_ids, write_llava_processor_configs,
    write_onevision_processor_configs, write_preprocessor_configs)


@dataclass(frozen=True)
class Workload:
    name: str
    image_side: int  # pixels; the image (or every frame) is square
    num_frames: int  # 0 = image
    max_new_tokens: int

    @property
    def is_video(self) -> bool:
        return self.num_frames > 0


WORKLOADS = {w.name: w for w in [
    Workload("vqa-256", 448, 0, 16),
    Workload("vqa-1024", 896, 0, 16),
    Workload("caption-1024", 896, 0, 128),
    Workload("video-16f", 448, 16, 64),
]}
MIXED = "mixed"  # a ragged mix of the fixed workloads' media, 3..128 new tokens each (BENCHMARKS.md)
# HF generate's best batch per workload on the H100 (BENCHMARKS.md anchors): its baseline.
HF_BEST_BATCH = {"vqa-256": 64, "vqa-1024": 16, "caption-1024": 16, "video-16f": 16, MIXED: 16}
TINY_SCALE = 4  # the tiny model sees images 4x smaller per side (16x fewer visual tokens)

QUESTION = ("Look carefully at the picture and answer the question about the objects, their colours, their "
            "positions and what the sign in the window says. Answer with one word.")


def qwen2_5_vl_7b_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = vision_token_ids(tokenizer)
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def qwen3_vl_8b_config(tokenizer):
    from transformers import Qwen3VLConfig

    text = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                    "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **vision_token_ids(tokenizer))


def llava_1_5_7b_config(tokenizer):
    from transformers import LlavaConfig

    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                rms_norm_eps=1e-5)
    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def llava_onevision_7b_config(tokenizer):
    from transformers import LlavaOnevisionConfig

    text = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152128, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14)
    return LlavaOnevisionConfig(text_config=text, vision_config=vision,
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                video_token_id=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


# name -> (family, config builder, end-of-turn token)
LARGE_MODELS = {"qwen2_5_vl_7b": ("qwen2_5_vl", qwen2_5_vl_7b_config, "<|im_end|>"),
                "qwen3_vl_8b": ("qwen3_vl", qwen3_vl_8b_config, "<|im_end|>"),
                "llava_1_5_7b": ("llava", llava_1_5_7b_config, "</s>"),
                "llava_onevision_7b": ("llava_onevision", llava_onevision_7b_config, "<|im_end|>")}
MODEL_NAMES = ("tiny", *LARGE_MODELS)
ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
                 "llava": "LlavaForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def write_model_folder(name: str, folder: Path):
    """A loadable folder for one of LARGE_MODELS without weights: its full config.json (with
    `architectures`, as vLLM's dummy loader needs), our offline tokenizer and processor configs.
    -> (config, tokenizer)."""
    family, build_config, _ = LARGE_MODELS[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family=family)
    tokenizer.save_pretrained(folder)
    config = build_config(tokenizer)
    if family == "llava":
        write_llava_processor_configs(folder, 336)
    elif family == "llava_onevision":
        write_onevision_processor_configs(folder, 384, config.image_grid_pinpoints, 27 * 27)
    else:
        factor = 32 if family == "qwen3_vl" else 28
        write_preprocessor_configs(folder, family, min_pixels=factor * factor * 4, max_pixels=factor * factor * 1280)
    config.architectures = [ARCHITECTURES[family]]
    (folder / "config.json").write_text(config.to_json_string())  # processors read the tower's size from it
    return config, tokenizer


def load_processor(name: str, folder: Path):
    family = LARGE_MODELS[name][0]
    return {"llava": LlavaFrameProcessor.from_pretrained, "llava_onevision": OnevisionProcessor.from_pretrained
            }.get(family, lambda f: QwenVLProcessor.from_pretrained(f, model_type=family))(folder)


def load_model(name: str, device: str, folder: Path | None = None):
    """-> (model, processor) for "tiny" or one of LARGE_MODELS. A large architecture gets random
    weights built on `device`; its tokenizer and processor configs go to `folder` (a temporary
    one by default), so `model.save_pretrained(folder)` makes it a loadable checkpoint."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if name == "tiny":
        path = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "qwen2_5_vl")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, device_map=device)
        return model.eval(), QwenVLProcessor.from_pretrained(path)
    if name not in LARGE_MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; use one of {', '.join(MODEL_NAMES)}")
    folder = Path(folder or tempfile.mkdtemp())
    config, tokenizer = write_model_folder(name, folder)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    end_of_turn = LARGE_MODELS[name][2]
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(end_of_turn),
                                               pad_token_id=0, do_sample=False)
    return model.eval(), load_processor(name, folder)


def random_media(workload: Workload, seed: int, scale: int = 1):
    """`workload`'s random image (PIL), or its frames (a list of PIL images), seeded by `seed`:
    the one definition of a benchmark's pixels, for our engine and for vLLM alike."""
    rng = np.random.default_rng(seed)
    side = workload.image_side // scale
    picture = lambda: Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))  # noqa: E731
    return [picture() for _ in range(workload.num_frames)] if workload.is_video else picture()


def prompt_for(processor, workload: Workload, question: str = QUESTION) -> str:
    """The chat prompt with one placeholder for the image or video (each system expands it)."""
    kind = "video" if workload.is_video else "image"
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}])


def make_sample(processor, workload: Workload, seed: int, scale: int = 1, frames: bool = False) -> dict:
    """One sample of `workload` with a random image (or video) seeded by `seed`: the processor's
    float patches, or with `frames` its resized uint8 frames (what the pipeline's CPU stage hands
    the engine: 8x fewer bytes to pin and upload, normalised and patchified on the device)."""
    media = random_media(workload, seed, scale)
    options = {"videos" if workload.is_video else "images": [media], **({"return_frames": True} if frames else {})}
    return processor(text=[prompt_for(processor, workload)], **options)


def device_for(model_name: str) -> torch.device:
    """The tiny model runs on CPU (seconds); the 7B architecture on the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() and model_name != "tiny" else "cpu")


def make_samples(processor, workload: Workload, count: int, model_name: str, first_seed: int = 0,
                 frames: bool = False) -> list[dict]:
    """`count` samples with seeds first_seed.., images shrunk TINY_SCALE x for the tiny model."""
    scale = TINY_SCALE if model_name == "tiny" else 1
    return [make_sample(processor, workload, seed=first_seed + i, scale=scale, frames=frames) for i in range(count)]


def mixed_plan(count: int, seed: int = 0) -> list[tuple[Workload, int, int]]:
    """The `mixed` workload: `count` (media kind, media seed, new tokens 3..128) drawn from the
    vqa-256 / vqa-1024 / video-16f media."""
    rng = np.random.default_rng(seed)
    kinds = [WORKLOADS[name] for name in ("vqa-256", "vqa-1024", "video-16f")]
    drawn = [kinds[int(rng.integers(len(kinds)))] for _ in range(count)]
    new_tokens = [int(n) for n in rng.integers(3, 129, count)]
    return [(kind, seed * 100_003 + i, n) for i, (kind, n) in enumerate(zip(drawn, new_tokens))]


def make_mixed_samples(processor, count: int, model_name: str, seed: int = 0,
                       frames: bool = False) -> tuple[list[dict], list[int]]:
    """`count` samples of the mixed plan, and each one's new tokens."""
    scale = TINY_SCALE if model_name == "tiny" else 1
    plan = mixed_plan(count, seed)
    return ([make_sample(processor, kind, media_seed, scale, frames) for kind, media_seed, _ in plan],
            [n for *_, n in plan])


def default_count(workload_name: str, tiny: bool) -> int:
    """Samples per workload in a throughput run (the same for our engine and for vLLM)."""
    if workload_name == MIXED:
        return 24 if tiny else 256
    return 16 if tiny else (128 if workload_name.startswith("vqa") else 64)


def stack_identical(sample: dict, batch_size: int) -> dict:
    """A `model.generate` batch of `batch_size` copies of one sample (no padding needed)."""
    batched = {}
    for key, value in sample.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            batched[key] = value.repeat(batch_size, 1)
        else:
            batched[key] = torch.cat([value] * batch_size)
    return batched
