"""A labeling job through Ray, end to end, on a model of benchmark size, with 1..N GPU engines.

    python benchmarks/job_throughput.py --model qwen2_5_vl_7b --kind image --rows 768 --gpu-actors 1,2 \
        --json out.json                                                   # multi-GPU scaling
    python benchmarks/job_throughput.py --model qwen2_5_vl_7b --kind video --rows 96 --gpu-actors 1
    python benchmarks/job_throughput.py --model tiny --rows 16            # CPU, seconds

Writes a random-weight checkpoint (the 7B architecture: ~16 GB) and a Parquet of `--rows`
inputs (the shipped sample photos at 896x896, or the sample videos, repeated under new ids),
then runs the job once per `--gpu-actors` value with `--warmup`. Throughput is the cost
report's: rows over the engines' span (first timed call's start to last call's end), so
start-up and each engine's warm-up batch stay out, waits on the CPU stage stay in. The
whole job's wall time (Ray start-up and model load included) is reported beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from workloads import load_model  # noqa: E402

SAMPLES = REPO / "jobs" / "sample_data"


def write_inputs(kind: str, rows: int, path: Path) -> None:
    if kind == "image":
        photos = []
        for data in pq.read_table(SAMPLES / "images.parquet").column("image").to_pylist():
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").resize((896, 896)).save(buffer, format="JPEG", quality=90)
            photos.append(buffer.getvalue())
        media = {"image": [photos[i % len(photos)] for i in range(rows)]}
    else:
        videos = pq.read_table(SAMPLES / "videos.parquet").column("video").to_pylist()
        media = {"video": [videos[i % len(videos)] for i in range(rows)]}
    pq.write_table(pa.table({"id": [f"r{i:06d}" for i in range(rows)], **media}), path)


def prepare(model_name: str, kind: str, rows: int, work: Path) -> tuple[list[str], Path]:
    """The job's --model arguments and input Parquet under `work`, written unless already there."""
    work.mkdir(parents=True, exist_ok=True)
    model_arg = []
    if model_name != "tiny":
        checkpoint = work / "model"
        if not any(checkpoint.glob("*.safetensors")):  # config.json alone is load_model's placeholder
            import torch

            model, _ = load_model(model_name, "cuda", folder=checkpoint)
            model.save_pretrained(checkpoint)
            del model
            torch.cuda.empty_cache()
        model_arg = ["--model", str(checkpoint)]
    source = work / f"{kind}-{rows}.parquet"
    if not source.exists():
        write_inputs(kind, rows, source)
    return model_arg, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=["tiny", "qwen2_5_vl_7b"])
    parser.add_argument("--kind", default="video", choices=["image", "video"])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--gpu-actors", default="1", help="comma-separated engine counts, one run each")
    parser.add_argument("--cpu-actors-per-gpu", type=int, default=12,
                        help="decode/preprocess actors per engine: a cluster's GPU nodes bring their CPUs too")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--method", default="sparsevlm")
    parser.add_argument("--budget", default="128")
    parser.add_argument("--max-new-tokens", default=None, help="default: 16 for images (vqa), 64 for videos")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work-dir", type=Path, help="where the checkpoint and inputs go (kept; reused when "
                                                     "already there); default: a fresh temporary folder")
    parser.add_argument("--prepare-only", action="store_true", help="write checkpoint and inputs, run nothing")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp())
    model_arg, source = prepare(args.model, args.kind, args.rows, work)
    if args.prepare_only:  # runs without Ray and pydantic installed
        print(f"prepared {source} and model arguments {model_arg}")
        return
    from pipeline.cli import main as job_main
    from pipeline.cost.metrics import run_metrics

    task = ["--task", "vqa", "--prompt", "What is in the picture? Answer in two words."] if args.kind == "image" \
        else ["--task", "caption"]
    new_tokens = args.max_new_tokens or ("16" if args.kind == "image" else "64")
    runs = []
    for actors in [int(n) for n in args.gpu_actors.split(",")]:
        output = Path(tempfile.mkdtemp(dir=work, prefix=f"out-{actors}-"))  # fresh: nothing to resume
        started = time.perf_counter()
        code = job_main(args.kind, "benchmark", base={},
                        argv=["--input", str(source), "--output", str(output), "--method", args.method,
                              "--budget", args.budget, "--max-new-tokens", new_tokens, "--num-frames", "16",
                              "--batch-size", args.batch_size, "--gpu-actors", str(actors),
                              "--cpu-actors", str(args.cpu_actors_per_gpu * actors), "--warmup", *task, *model_arg])
        job_seconds = time.perf_counter() - started
        table = pads.dataset(str(output), format="parquet").to_table()
        figures = run_metrics(table, gpu_hour_usd=1.0)
        per_engine = {worker: run_metrics(table.filter(pc.equal(table.column("worker"), worker)), 1.0)
                      for worker in pc.unique(table.column("worker")).to_pylist()}
        runs.append({"gpu_actors": actors, "exit_code": code, "job_seconds": job_seconds,
                     "rows_per_s_job": len(table) / job_seconds, **figures,
                     "per_engine": {w: {k: m[k] for k in ("succeeded", "span_s", "samples_per_s")}
                                    for w, m in per_engine.items()}})
        print(f"{actors} engine(s): {figures.get('samples_per_s', 0):.2f} rows/s over the engines' span "
              f"({figures.get('span_s', 0):.1f}s), job {job_seconds:.1f}s, errors {figures['errors']}", flush=True)
    base = runs[0].get("samples_per_s")
    for run in runs:
        run["scaling_vs_first"] = run["samples_per_s"] / base if base and run.get("samples_per_s") else None
    report = {"command": " ".join(["python", *sys.argv]), "model": args.model, "kind": args.kind,
              "rows": args.rows, "method": f"{args.method}-{args.budget}", "runs": runs}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
