"""Offline demo: label a few generated images and a video with the embedded tiny model.

    python -m sparsevlm.demo [--model PATH_OR_ID] [--max-new-tokens N]

With no --model it builds (once) a random-weight tiny Qwen2.5-VL under .cache/, so the
answers are gibberish; the point is the path: processor -> VLMEngine -> text + stats,
checked against transformers' own `generate`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import SamplingParams, SparsityConfig, VLMEngine
from .tiny import build_tiny_checkpoint

DEFAULT_MODEL_DIR = Path(".cache/tiny-qwen2_5_vl")


def shapes_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A background with a few coloured shapes: deterministic stand-in for a photo."""
    import random

    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randint(0, size[0] - 20), rng.randint(0, size[1] - 20)
        box = (x, y, x + rng.randint(10, size[0] // 2), y + rng.randint(10, size[1] // 2))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def demo_samples(processor) -> list[tuple[str, dict]]:
    def prompt(kind: str | None, question: str) -> str:
        content = ([{"type": kind}] if kind else []) + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}])

    video = [shapes_image(100 + t, (160, 120)) for t in range(8)]
    return [
        ("image 224x224, caption", processor(text=[prompt("image", "Describe this image.")],
                                             images=[shapes_image(1, (224, 224))])),
        ("image 320x180, VQA", processor(text=[prompt("image", "What colour is the circle?")],
                                         images=[shapes_image(2, (320, 180))])),
        ("video 8 frames", processor(text=[prompt("video", "Caption the video.")], videos=[video])),
        ("text only", processor(text=[prompt(None, "Say hello.")])),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local path or hub id (default: the embedded tiny model)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--preset", type=int, default=128, help="sparsevlm budget for the second pass")
    args = parser.parse_args()
    model = args.model
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            build_tiny_checkpoint(DEFAULT_MODEL_DIR, "qwen2_5_vl")
        model = str(DEFAULT_MODEL_DIR)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    engine = VLMEngine.from_pretrained(model, dtype=dtype)
    named = demo_samples(engine.processor)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    results = engine.generate([sample for _, sample in named], params)
    elapsed = time.perf_counter() - started
    print(f"model {model} on {engine.device} ({engine.backend.name} attention), {len(named)} samples in {elapsed:.2f}s")
    print(f"{'sample':<24} {'prompt':>6} {'visual':>6} {'new':>4} {'= generate':>10}  text")
    for (name, sample), result in zip(named, results):
        reference = engine.model.generate(**{k: v.to(engine.device) for k, v in sample.items()},
                                          max_new_tokens=params.max_new_tokens, do_sample=False)
        same = reference[0, sample["input_ids"].shape[1]:].tolist() == result.token_ids
        s = result.stats
        print(f"{name:<24} {s.n_prompt_tokens:>6} {s.n_visual_tokens:>6} {s.n_generated_tokens:>4} "
              f"{str(same):>10}  {result.text!r}")
    sparsity = SparsityConfig(method="sparsevlm", preset=args.preset)
    sparse = engine.generate([sample for _, sample in named], params, sparsity=sparsity)
    print(f"\nwith {sparsity.label}:")
    print(f"{'sample':<24} {'visual':>6} {'kept':>5} {'equiv':>6} {'FLOPs':>6}  text")
    for (name, _), result in zip(named, sparse):
        s = result.stats
        print(f"{name:<24} {s.n_visual_tokens:>6} {s.n_visual_tokens_kept:>5} {s.equiv_visual_tokens:>6.1f} "
              f"{s.prefill_flops / s.prefill_flops_dense:>6.0%}  {result.text!r}")


if __name__ == "__main__":
    main()
