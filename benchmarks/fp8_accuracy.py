"""What FP8 vision GEMMs (`EngineConfig.vision_fp8`) cost in accuracy, on a scene probe.

    python -m benchmarks.fp8_accuracy --model .cache/probe-v3 --seed 11 --n 400 --json out.json
    python -m benchmarks.fp8_accuracy --model jobs/models/scene-probe --seed 7 --n 400

Each configuration (dense and sparsevlm-128 by default) answers the same fresh scenes twice,
with the tower as loaded and with its linear layers in FP8, on one set of weights (two engines
over one model). Reported: both accuracies with 95% intervals, and agreement, the share of
scenes answered identically. The full-precision side is the dtype the probe runs in (fp32 on
CPU, bf16 on CUDA); the FP8 side differs only in the tower's and projector's GEMMs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks import accuracy, scenes
from pipeline.model_source import PROBE_PATH
from sparsevlm import EngineConfig, SparsityConfig, VLMEngine


def compare(model: Path, seed: int, n: int, labels: list[str], batch_size: int, device: str,
            on_row=lambda rows: None) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reference = VLMEngine.from_pretrained(str(model), dtype=dtype, device=device)
    fp8 = VLMEngine(reference.model, reference.processor, engine_config=EngineConfig(vision_fp8=True))
    takes_video = "video" in reference.adapter.media_kinds  # probe v3 (LLaVA-shaped) answers image questions only
    qtypes = scenes.IMAGE_TYPES + (scenes.VIDEO_TYPES if takes_video else ())
    rows = []
    for label in labels:
        sparsity = SparsityConfig.parse(label)
        runs = {name: accuracy.run(engine, seed, n, sparsity, batch_size=batch_size, qtypes=qtypes, keep_answers=True)
                for name, engine in (("reference", reference), ("fp8", fp8))}
        same = sum(a == b for a, b in zip(runs["reference"]["answers"], runs["fp8"]["answers"]))
        row = {"method": label, "n": n, "agreement": same / n,
               **{f"{name}_{key}": run[key] for name, run in runs.items()
                  for key in ("accuracy", "ci95", "by_type", "final_visual_tokens_mean", "seconds")}}
        rows.append(row)
        print(f"{label:<16} accuracy {row['reference_accuracy']:.3f} -> FP8 {row['fp8_accuracy']:.3f}, "
              f"same answer {row['agreement']:.1%}", flush=True)
        on_row(rows)
    return rows


def table(rows: list[dict], precision: str) -> str:
    lines = [f"| method | accuracy, tower in {precision} (95%) | accuracy, FP8 GEMMs (95%) | same answer |",
             "|---|---|---|---|"]
    for row in rows:
        ref, fp8 = row["reference_ci95"], row["fp8_ci95"]
        lines.append(f"| `{row['method']}` | {row['reference_accuracy']:.3f} ({ref[0]:.2f}-{ref[1]:.2f}) | "
                     f"{row['fp8_accuracy']:.3f} ({fp8[0]:.2f}-{fp8[1]:.2f}) | {row['agreement']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=PROBE_PATH, help="a scene probe (probe v3: "
                        "`python -m benchmarks.probe_v3 assemble` writes .cache/probe-v3)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--methods", default="none,sparsevlm-128", help="sparsity labels, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        parser.error(f"no model at {args.model}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if device == "cuda" else "fp32"

    def write(rows: list[dict]) -> None:  # after every row: a long run cut short keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "command": " ".join(["python -m benchmarks.fp8_accuracy", *sys.argv[1:]]), "model": str(args.model),
                "seed": args.seed, "n": args.n, "device": device,
                "reference_precision": precision, "rows": rows}, indent=2))

    rows = compare(args.model, args.seed, args.n, args.methods.split(","), args.batch_size, device, on_row=write)
    print(table(rows, precision))


if __name__ == "__main__":
    main()
