"""Does pruning keep the tokens a question is about? Coverage of the asked objects, per method.

    python -m benchmarks.coverage --seed 7 --n 160 --preset 64 --json out.json
    python -m benchmarks.coverage --model .cache/probe-v3 --seed 11 --n 400 --preset 128   # probe v3 (images)

For each scene of a fresh test set (benchmarks/scenes.py), the visual tokens that show an
object the question names (from what was drawn, `probe_data.objects_under_tokens`), and the
share of them still in the stream after the last pruning layer (`kept_visual_positions`;
merged tokens are not counted). Beside it, the share of all visual tokens kept: what a
method that ignores the question keeps of the object on average. Coverage well above that
share means the method finds the region the answer lives in. Per question type, with the
probe's accuracy under the same method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


from benchmarks import scenes
from benchmarks.accuracy import PROBE
from benchmarks.probe_data import encode, objects_under_tokens

from pipeline.cost.metrics import normalize_answer
from sparsevlm import SamplingParams, SparsityConfig, VLMEngine

METHODS = ("sparsevlm", "sparsevlm_v2", "fastv", "random")


def asked_objects(sample: scenes.Sample) -> set[int]:
    """1-based indices into sample.things of the objects the question is about (empty when it
    names none that was drawn, e.g. "Is there a green square?" -> no)."""
    question, things = sample.question, sample.things
    named = {i for i, t in enumerate(things, start=1) if f"the {t.name}" in question or f"a {t.name}" in question}
    if named or sample.qtype in ("exists", "position", "read", "motion", "order"):
        return named
    if sample.qtype == "count":
        return {i for i, t in enumerate(things, start=1) if f"many {t.shape}s" in question}
    if sample.qtype == "shape":
        return {i for i, t in enumerate(things, start=1) if f"the {t.colour} object" in question}
    return {i for i, t in enumerate(things, start=1)  # colour: "the triangle" / "the large triangle"
            if question.endswith(f"the {t.shape}?") or question.endswith(f"the {t.size} {t.shape}?")}


def token_grid(engine: VLMEngine, inputs: dict, sample: scenes.Sample) -> tuple[int, int, int]:
    """(frame groups, rows, columns) of a sample's visual tokens, in token order."""
    if sample.kind == "image":
        _, rows, columns = engine.adapter.first_token_grid(engine.processor, sample.frames[0], "image")
        return 1, rows, columns
    groups, height, width = inputs["video_grid_thw"][0].tolist()
    merge = engine.processor.video_cfg.merge_size
    return groups, height // merge, width // merge


def measure(engine: VLMEngine, samples: list[scenes.Sample], sparsity: SparsityConfig, batch_size: int = 32) -> dict:
    processor = engine.processor
    rows = []
    for first in range(0, len(samples), batch_size):
        chunk = samples[first:first + batch_size]
        encoded = [encode(processor, s, with_answer=False) for s in chunk]
        results = engine.generate(encoded, SamplingParams(max_new_tokens=6), sparsity=sparsity)
        for sample, inputs, result in zip(chunk, encoded, results):
            under = objects_under_tokens(sample, *token_grid(engine, inputs, sample))
            relevant = np.isin(under, list(asked_objects(sample)))
            kept = np.zeros(len(under), dtype=bool)
            kept[result.stats.kept_visual_positions] = True
            right = normalize_answer(result.text) == normalize_answer(sample.answer)
            rows.append({"qtype": sample.qtype, "right": right,
                         "object_tokens": int(relevant.sum()), "object_kept": int((relevant & kept).sum()),
                         "share_kept": float(kept.mean())})
    by_type = {}
    for qtype in sorted({r["qtype"] for r in rows}):
        mine = [r for r in rows if r["qtype"] == qtype]
        with_object = [r for r in mine if r["object_tokens"]]
        by_type[qtype] = {
            "n": len(mine), "accuracy": sum(r["right"] for r in mine) / len(mine),
            "object_tokens_kept": (sum(r["object_kept"] for r in with_object)
                                   / max(1, sum(r["object_tokens"] for r in with_object))),
            "all_tokens_kept": sum(r["share_kept"] for r in mine) / len(mine)}
    return by_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--n", type=int, default=160)
    parser.add_argument("--preset", type=int, default=64, choices=[64, 96, 128, 192])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", type=Path, default=PROBE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = VLMEngine.from_pretrained(str(args.model), dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                       device=device)
    video = scenes.VIDEO_TYPES if "video" in engine.adapter.media_kinds else ()
    samples = scenes.generate(args.seed, args.n, scenes.IMAGE_TYPES + video)
    result = {"command": " ".join(["python -m benchmarks.coverage", *sys.argv[1:]]), "model": str(args.model),
              "seed": args.seed, "n": args.n, "preset": args.preset, "methods": {}}
    print("| method | type | accuracy | asked-object tokens kept | all visual tokens kept |\n|---|---|---|---|---|")
    for method in args.methods.split(","):
        by_type = measure(engine, samples, SparsityConfig(method=method, preset=args.preset))
        result["methods"][method] = by_type
        for qtype, row in by_type.items():
            print(f"| {method}-{args.preset} | {qtype} | {row['accuracy']:.2f} | {row['object_tokens_kept']:.0%} | "
                  f"{row['all_tokens_kept']:.0%} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
