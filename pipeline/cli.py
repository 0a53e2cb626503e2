"""The command line shared by the jobs: --config FILE plus flags that override it, then a summary."""

from __future__ import annotations

import argparse
import sys
import time

import pyarrow.compute as pc

from schemas import ConfigError, JobConfig
from schemas.config import SparsitySection
from sparsevlm.config import LABEL_GRAMMAR, parse_label, parse_schedule

from .run import run_job

FLAGS = [  # (flag, config field, type, help)
    ("--input", "input.uri", str, "Parquet file or folder, local or URI (default: the shipped sample data)"),
    ("--id-column", "input.id_column", str, "column with unique row ids (default: id)"),
    ("--media-column", "input.media_column", str, "column with the media (default: image or video)"),
    ("--limit", "input.limit", int, "only the first N input rows"),
    ("--output", "output.uri", str, "output folder, local or URI (default: runs/<kind>-<time>)"),
    ("--model", "model.path", str, "model path or hub id of a supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
                                   "LLaVA-1.5, LLaVA-OneVision; read from its config.json) (default: "
                                   "embedded:scene-probe, the probe trained here; embedded:tiny-qwen2_5_vl: random "
                                   "weights)"),
    ("--dtype", "model.dtype", str, "bfloat16 (default), float16 or float32 on GPU; CPU always uses float32"),
    ("--method", "sparsity.method", str, "none, sparsevlm (default), sparsevlm_v2, fastv or random"),
    ("--schedule", "sparsity.schedule", lambda text: _argument(parse_schedule, text),
     "prune after these layers: 2:300,6:r0.5 (a count, or r and a share of the visual tokens)"),
    ("--tau", "sparsity.tau", float, "share of deleted tokens recycled into merged ones (default: 0.3)"),
    ("--theta", "sparsity.theta", float, "merged tokens per recycled token (default: 0.1)"),
    ("--recycle", "sparsity.recycle", lambda text: _argument(_on_off, text), "on or off (default: on for "
                                                                             "sparsevlm)"),
    ("--rank-scale", "sparsity.rank_scale", float, "rank-adaptive keep = scale * rank + bias (default: 13.5)"),
    ("--rank-bias", "sparsity.rank_bias", float, "rank-adaptive bias (default: 0)"),
    ("--fastv-layer", "sparsity.fastv_layer", int, "layer fastv and random prune after (default: 2 of 32, "
                                                   "mapped to the model's depth)"),
    ("--task", "generation.task", str, "caption or vqa"),
    ("--prompt", "generation.prompt", str, "prompt for rows without one"),
    ("--max-new-tokens", "generation.max_new_tokens", int, "tokens to generate at most (default: 128)"),
    ("--temperature", "generation.temperature", float, "0 = greedy (default)"),
    ("--num-frames", "media.num_frames", int, "frames sampled uniformly per video (default: 16)"),
    ("--fps", "media.fps", float, "sample video frames at this rate instead"),
    ("--max-pixels", "media.max_pixels", int, "pixels per image or frame after resizing"),
    ("--gpu-actors", "resources.gpu_actors", int, "engines (default: one per GPU)"),
    ("--gpus-per-actor", "resources.gpus_per_actor", float, "GPU share per engine: 0.5 = two per GPU (default: 1)"),
    ("--cpu-actors", "resources.cpu_actors", int, "decode/preprocess actors (default: 2)"),
    ("--batch-size", "resources.batch_size", int, "rows per engine call (default: 64)"),
]


def _argument(parse, text: str):
    try:
        return parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise ValueError(f"say on or off, not {text!r}")
    return text.lower() == "on"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML job config (sections: input, model, sparsity, generation, media, "
                                    "resources, output); flags override it")
    for flag, field, kind, text in FLAGS:
        p.add_argument(flag, dest=field, type=kind, default=None, help=f"{text} [{field}]")
    p.add_argument("--sparsity", metavar="LABEL", type=lambda text: _argument(parse_label, text),
                   help=f"the whole sparsity section in one label (as the method column and the cost report "
                        f"write it), e.g. sparsevlm-128+tau=0.2; other sparsity flags apply on top. Labels: "
                        f"{LABEL_GRAMMAR}")
    p.add_argument("--budget", help="sparsity budget: a preset (64, 96, 128, 192) or a keep ratio (0 < r <= 1)")
    p.add_argument("--vision-fp8", action="store_true", help="the vision tower's GEMMs in FP8 (Ada or Hopper GPU) "
                                                             "[model.vision_fp8]")
    p.add_argument("--rank-adaptive", action="store_true", help="sparsevlm keeps floor(rank_scale * rank(R) + "
                                                                "rank_bias) tokens, at most the budget")
    p.add_argument("--no-resume", action="store_true", help="refuse to write into an output that has results")
    p.add_argument("--warmup", action="store_true", help="run each GPU actor's first batch twice, timing the "
                                                        "second (compilation stays out of the stats)")
    return p


def overrides(args: argparse.Namespace) -> dict:
    values = {}
    if args.sparsity is not None:  # the label replaces the section: what it does not say is the default
        values = {f"sparsity.{name}": args.sparsity.get(name, field.default)
                  for name, field in SparsitySection.model_fields.items()}
    values |= {field: getattr(args, field) for _, field, _, _ in FLAGS if getattr(args, field) is not None}
    if args.rank_adaptive:
        values["sparsity.rank_adaptive"] = True
    if args.vision_fp8:
        values["model.vision_fp8"] = True
    if args.budget is not None:
        budget = float(args.budget)
        values["sparsity.preset" if budget > 1 else "sparsity.keep_ratio"] = int(budget) if budget > 1 else budget
    if args.no_resume:
        values["output.resume"] = False
    if args.warmup:
        values["resources.warmup"] = True
    return values


def main(kind: str, description: str, base: dict, argv: list[str] | None = None) -> int:
    args = parser(description).parse_args(argv)
    try:
        config = JobConfig.load(args.config, overrides(args), base=base)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        plan = run_job(config, kind)
    except ValueError as error:  # bad input location or columns: nothing ran
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    summarise(plan, elapsed, config.input.id_column)
    return 0


def summarise(plan, elapsed: float, id_column: str = "id") -> None:
    import pyarrow.dataset as pads

    table = pads.dataset(plan.output_uri, format="parquet").to_table(
        columns=["id", "output", "error", "n_visual_tokens", "n_visual_tokens_kept", "equiv_visual_tokens"])
    errors = table.filter(pc.is_valid(table.column("error")))
    ok = table.filter(pc.is_null(table.column("error")))
    new_rows = len(table) - plan.n_done
    print(f"\n{plan.output_uri}: {len(table)} rows ({new_rows} this run, {plan.n_done} from earlier runs), "
          f"{len(errors)} errors, {len(plan.duplicates)} duplicated ids")
    print(f"{new_rows / elapsed:.2f} rows/s over {elapsed:.1f}s (Ray start-up and model load included)")
    if len(ok):
        visual = pc.sum(ok.column("n_visual_tokens")).as_py() or 0
        kept = pc.sum(ok.column("n_visual_tokens_kept")).as_py() or 0
        equiv = pc.mean(ok.column("equiv_visual_tokens")).as_py() or 0
        print(f"visual tokens kept: {kept} of {visual} ({kept / max(visual, 1):.1%}); "
              f"layer-averaged {equiv:.1f} per sample")
        compare_with_references(plan.input_uri, id_column, ok)
    for row in errors.slice(0, 5).to_pylist():
        print(f"  error {row['id']!r}: {row['error']}")


def compare_with_references(input_uri: str, id_column: str, ok, column: str = "answer", shown: int = 5) -> None:
    """Where the input has reference answers (the shipped scene samples do): exact match after
    normalisation, and the first few answers beside their references."""
    import pyarrow.dataset as pads

    from pipeline.cost.metrics import normalize_answer

    dataset = pads.dataset(input_uri, format="parquet")
    if column not in dataset.schema.names:
        return
    table = dataset.to_table(columns=[id_column, column])
    references = dict(zip(table.column(id_column).to_pylist(), table.column(column).to_pylist()))
    rows = sorted((row for row in ok.select(["id", "output"]).to_pylist() if row["id"] in references),
                  key=lambda row: str(row["id"]))
    if not rows:
        return
    right = [normalize_answer(row["output"] or "") == normalize_answer(references[row["id"]] or "") for row in rows]
    print(f"answers matching the input's {column!r} column: {sum(right)} of {len(rows)}")
    for row, correct in list(zip(rows, right))[:shown]:
        verdict = "right" if correct else f"reference: {references[row['id']]!r}"
        print(f"  {row['id']}: {row['output']!r} ({verdict})")
