"""Cost report: the same inputs through the pipeline with and without sparsification, compared.

    python jobs/cost_report.py                                  # shipped sample images, embedded model, CPU
    python jobs/cost_report.py --input data/ --model /models/qwen2.5-vl-7b --gpu-hour-usd 3.2
    python jobs/cost_report.py --from-runs runs/dense runs/sparsevlm-128 --input data/   # finished runs

Writes <output>/report.md (figures beside it), report.html (self-contained) and report.json,
and the runs themselves under <output>/runs/<configuration>. Configurations: dense,
dense-lowres (fewer pixels instead of fewer tokens: --lowres-max-pixels), and
<method>[-<budget>] with method sparsevlm, sparsevlm_v2, fastv or random, budget a preset
(64, 96, 128, 192) or a keep ratio (e.g. 0.25).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, when not pip-installed

import pyarrow.dataset as pads  # noqa: E402

from pipeline.cost.configs import DEFAULT_CONFIGS, overrides_for  # noqa: E402
from pipeline.cost.render import to_html, to_markdown  # noqa: E402
from pipeline.cost.report import Context, Run, blocks, compute, summary_table  # noqa: E402
from pipeline.cost.runs import run_configurations  # noqa: E402
from pipeline.model_source import REPO, TINY_MODEL  # noqa: E402
from schemas import ConfigError, JobConfig  # noqa: E402

# The report's offline default: the photo samples and the random-weight tiny model, seven Ray runs
# in ~2 minutes on 2 CPU cores. On the scene samples and the probe the same report took 690 s there
# (not yet profiled); give --input jobs/sample_data/scenes_images.parquet --model embedded:scene-probe.
PHOTO_SAMPLES = {"image": REPO / "jobs" / "sample_data" / "images.parquet",
                 "video": REPO / "jobs" / "sample_data" / "videos.parquet"}

# Assumed on-demand price of one data-centre GPU hour; pass your own with --gpu-hour-usd.
DEFAULT_GPU_HOUR_USD = 2.50
DEFAULT_VQA_PROMPT = "What is the main subject of this image? Answer in one or two words."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["image", "video"], default="image", help="input media (default: image)")
    p.add_argument("--input", help="Parquet file or folder (default: the shipped sample data of --kind)")
    p.add_argument("--config", help="a job YAML every run starts from (model, media, resources, ...)")
    p.add_argument("--model", help="model path or hub id (default: the embedded offline model)")
    p.add_argument("--task", choices=["caption", "vqa"], help="default: vqa for images, caption for videos")
    p.add_argument("--prompt", help=f"prompt for rows without one (vqa default: {DEFAULT_VQA_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, help="default: 16 for vqa, 64 for captions")
    p.add_argument("--limit", type=int, help="only the first N input rows")
    p.add_argument("--batch-size", type=int, help="rows per engine call (default: the job's, 64)")
    p.add_argument("--gpu-actors", type=int, help="engines, one GPU each (default: all GPUs)")
    p.add_argument("--cpu-actors", type=int, help="decode/preprocess actors (default: the job's, 2)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated: dense, dense-lowres or "
                   "sparsity labels, each optionally ending in @fp8 (vision GEMMs in FP8) (default: %(default)s)")
    p.add_argument("--lowres-max-pixels", type=int,
                   help="pixels per image or frame of dense-lowres (default: a quarter of the dense run's)")
    p.add_argument("--baseline", default="dense", help="the run others are compared with (default: dense)")
    p.add_argument("--from-runs", nargs="+", metavar="DIR",
                   help="report on finished runs' output folders instead of running (named by folder)")
    p.add_argument("--reference-column", default="answer",
                   help="input column with reference answers, for accuracy (default: answer, if present)")
    p.add_argument("--gpu-hour-usd", type=float, default=DEFAULT_GPU_HOUR_USD,
                   help="price of one GPU hour (default: %(default)s, an assumed on-demand price)")
    p.add_argument("--gallery", type=int, default=3, help="images in the kept-patch gallery (default: 3)")
    p.add_argument("--output", help="report folder (default: reports/cost-<time>)")
    return p.parse_args(argv)


def common_overrides(args: argparse.Namespace, task: str) -> dict:
    values = {"input.uri": args.input, "model.path": args.model, "input.limit": args.limit,
              "resources.batch_size": args.batch_size, "resources.gpu_actors": args.gpu_actors,
              "resources.cpu_actors": args.cpu_actors, "generation.task": task,
              "generation.max_new_tokens": args.max_new_tokens or (16 if task == "vqa" else 64),
              "generation.prompt": args.prompt or (DEFAULT_VQA_PROMPT if task == "vqa" else None)}
    return {k: v for k, v in values.items() if v is not None}


def references(input_uri: str, id_column: str, column: str) -> dict | None:
    dataset = pads.dataset(input_uri, format="parquet")
    if column not in dataset.schema.names:
        return None
    table = dataset.to_table(columns=[id_column, column])
    return dict(zip(table.column(id_column).to_pylist(), table.column(column).to_pylist()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    task = args.task or ("vqa" if args.kind == "image" else "caption")
    output = Path(args.output or Path("reports") / f"cost-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        common = common_overrides(args, task)
        base = {"generation": {"task": task}, "model": {"path": TINY_MODEL}}
        if not args.from_runs:  # finished runs come from inputs only --input or --config names
            base["input"] = {"uri": str(PHOTO_SAMPLES[args.kind])}
        job = JobConfig.load(args.config, common, base=base)
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        for name in names:
            overrides_for(name, args.lowres_max_pixels)  # a typo fails before anything runs
        if args.from_runs:
            runs = [Run.read(Path(d).name, d) for d in args.from_runs]
        else:
            runs = run_configurations(names, args.kind, common, args.config, base,
                                      output / "runs", args.lowres_max_pixels)
        input_uri = job.input.uri
        media_column = job.input.media_column or args.kind
        # finished runs of unknown inputs: no gallery or references unless --input says where they are
        knows_inputs = not args.from_runs or job.input.uri is not None
        context = Context(
            command=shlex.join(["python", "jobs/cost_report.py", *(sys.argv[1:] if argv is None else argv)]),
            dataset=args.input or f"shipped sample {args.kind}s", kind=args.kind,
            model_path=job.model.path, gpu_hour_usd=args.gpu_hour_usd,
            baseline=args.baseline, media=job.media.model_dump(),
            references=references(input_uri, job.input.id_column, args.reference_column) if knows_inputs else None,
            gallery_source=(input_uri, job.input.id_column, media_column) if knows_inputs else None,
            gallery_size=args.gallery)
        report = compute(runs, context)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    content = blocks(report, runs, context)
    (output / "report.md").write_text(to_markdown(content, output))
    (output / "report.html").write_text(to_html(content, f"Cost report: {report['dataset']}"))
    (output / "report.json").write_text(json.dumps(report, indent=2))
    table = summary_table(report)
    print("\n" + to_markdown([table], output))
    print(f"report: {output / 'report.md'}, {output / 'report.html'}, {output / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
