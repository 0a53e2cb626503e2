"""Accuracy retention: what each pruning method keeps of the scene probe's accuracy.

    python -m benchmarks.accuracy --seed 7 --n 400 --method sparsevlm --preset 64 --json out.json
    python -m benchmarks.accuracy --seed 7 --n 400 --method none --max-pixels 19600     # lower resolution
    python -m benchmarks.accuracy --seed 7 --n 400 --sweep --json benchmarks/results/accuracy.json

A fresh test set from `--seed` (benchmarks/scenes.py; the probe trained on seeds from
1,000,000 on), answered greedily by `VLMEngine` (CPU float32 unless CUDA is there),
scored by exact match after normalisation, overall and per question type. `--sweep` runs
the committed table: dense, sparsevlm at each preset, sparsevlm_v2, fastv and random at
the same budgets, and dense at a lower resolution giving about as many visual tokens as
each preset keeps on average over the layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch


from benchmarks import scenes
from benchmarks.probe_data import encode

from pipeline.model_source import PROBE_PATH as PROBE
from sparsevlm import SamplingParams, SparsityConfig, VLMEngine
from sparsevlm.preprocess import QwenVLProcessor

PRESETS = (192, 128, 64)


def wilson_interval(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of an accuracy measured as right / n (Wilson score: sane at 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run(engine: VLMEngine, seed: int, n: int, sparsity: SparsityConfig, max_pixels: int | None = None,
        batch_size: int = 32, qtypes: tuple[str, ...] = scenes.IMAGE_TYPES + scenes.VIDEO_TYPES,
        keep_answers: bool = False) -> dict:
    """Accuracy of one configuration on the n scenes of `seed` (cycling through `qtypes`);
    `keep_answers` adds every answer, in scene order (to compare two runs answer by answer)."""
    processor = engine.processor
    if max_pixels:  # lower resolution: the same scenes, resized smaller before the vision tower
        image_cfg, video_cfg = processor.image_cfg, processor.video_cfg
        processor = QwenVLProcessor(processor.tokenizer,
                                    dataclasses.replace(image_cfg, min_pixels=max_pixels, max_pixels=max_pixels),
                                    dataclasses.replace(video_cfg, min_pixels=max_pixels, max_pixels=max_pixels),
                                    processor.with_second_per_grid_ts)
    samples = scenes.generate(seed, n, qtypes)
    params = SamplingParams(max_new_tokens=6)
    answered, visual, equiv, final = [], [], [], []
    started = time.perf_counter()
    for first in range(0, n, batch_size):
        chunk = samples[first:first + batch_size]
        results = engine.generate([encode(processor, s, with_answer=False) for s in chunk], params, sparsity=sparsity)
        for sample, result in zip(chunk, results):
            answered.append((sample, result.text))
            visual.append(result.stats.n_visual_tokens)
            equiv.append(result.stats.equiv_visual_tokens)
            final.append(result.stats.n_visual_tokens_kept)
    scored = scenes.score(answered)
    return {**scored, "ci95": wilson_interval(round(scored["accuracy"] * scored["n"]), scored["n"]),
            "visual_tokens_mean": sum(visual) / len(visual), "equiv_visual_tokens_mean": sum(equiv) / len(equiv),
            "final_visual_tokens_mean": sum(final) / len(final), "seconds": time.perf_counter() - started,
            **({"answers": [text for _, text in answered]} if keep_answers else {})}


def sweep_configs(visual_tokens: float) -> list[tuple[str, SparsityConfig, int | None]]:
    configs: list[tuple[str, SparsityConfig, int | None]] = [("none", SparsityConfig(method="none"), None)]
    for preset in PRESETS:
        configs += [(f"{method}-{preset}", SparsityConfig(method=method, preset=preset), None)
                    for method in ("sparsevlm", "sparsevlm_v2", "fastv", "random")]
    for preset in PRESETS:  # as many visual tokens per image as the preset keeps, layer-averaged (~ V * P / 576)
        tokens = visual_tokens * preset / 576
        configs.append((f"lowres-{preset}", SparsityConfig(method="none"), int(tokens * 28 * 28)))
    return configs


def table(rows: list[dict]) -> str:
    types = sorted(rows[0]["by_type"])
    lines = ["| configuration | visual tokens: final / layer-avg | accuracy (95% interval) | of dense | "
             + " | ".join(types) + " |", "|---|---|---|---|" + "---|" * len(types)]
    dense = rows[0]["accuracy"]
    for row in rows:
        kept = f"{row['accuracy'] / dense:.0%}" if dense else "n/a"
        final = row.get("final_visual_tokens_mean")
        tokens = f"{final:.0f} / " if final is not None else ""
        interval = " ({:.2f}-{:.2f})".format(*row["ci95"]) if "ci95" in row else ""
        lines.append(f"| `{row['name']}` | {tokens}{row['equiv_visual_tokens_mean']:.0f} | {row['accuracy']:.3f}"
                     f"{interval} | {kept} | " + " | ".join(f"{row['by_type'][t]:.2f}" for t in types) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--method", default="none", choices=["none", "sparsevlm", "sparsevlm_v2", "fastv", "random"])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--preset", type=int, choices=[64, 96, 128, 192])
    budget.add_argument("--keep-ratio", type=float)
    parser.add_argument("--max-pixels", type=int, help="resize scenes to this many pixels (lower resolution)")
    parser.add_argument("--sweep", action="store_true", help="the committed table (ignores --method/--preset)")
    parser.add_argument("--model", type=Path, default=PROBE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        parser.error(f"no model at {args.model} (train one: python -m benchmarks.train_probe --out {args.model})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # flash attention on CUDA wants bf16
    engine = VLMEngine.from_pretrained(str(args.model), dtype=dtype, device=device)
    command = " ".join(["python", *sys.argv])
    if not args.sweep:
        sparsity = SparsityConfig(method=args.method, preset=args.preset, keep_ratio=args.keep_ratio)
        result = {"command": command, "seed": args.seed, "method": sparsity.label, "max_pixels": args.max_pixels,
                  **run(engine, args.seed, args.n, sparsity, args.max_pixels, args.batch_size)}
        print(table([{"name": sparsity.label, **result}]))
    else:
        rows = []
        dense = run(engine, args.seed, args.n, SparsityConfig(method="none"), None, args.batch_size)
        for name, sparsity, pixels in sweep_configs(dense["visual_tokens_mean"]):
            row = dense if name == "none" else run(engine, args.seed, args.n, sparsity, pixels, args.batch_size)
            rows.append({"name": name, "max_pixels": pixels, **row})
            print(f"{name:<18} accuracy {row['accuracy']:.3f} (visual tokens, layer-averaged "
                  f"{row['equiv_visual_tokens_mean']:.0f})", flush=True)
            if args.json:  # as it goes: a long sweep cut short keeps its rows
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"command": command, "seed": args.seed, "n": args.n, "rows": rows}))
        result = {"command": command, "seed": args.seed, "n": args.n, "model": str(args.model), "rows": rows}
        print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
