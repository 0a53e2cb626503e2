"""A labeling job through Ray, end to end, on a model of benchmark size, with 1..N GPU engines.

    python -m benchmarks.job_throughput --model qwen2_5_vl_7b --kind image --rows 768 --gpu-actors 1,2 \
        --json out.json                                                   # multi-GPU scaling
    python -m benchmarks.job_throughput --model qwen2_5_vl_7b --kind video --rows 96 --gpu-actors 1
    python -m benchmarks.job_throughput --model qwen2_5_vl_7b --kind image --rows 512 --gpu-actors 2 \
        --gpus-per-actor 0.5 --cpu-actors-per-gpu 7 --method sparsevlm    # two engines sharing one GPU
    python -m benchmarks.job_throughput --model tiny --rows 16            # CPU, seconds

Writes a random-weight checkpoint (the 7B architecture: ~16 GB) and a Parquet of `--rows`
inputs (the shipped sample photos at 896x896, each row's made unique by its own noise; or the
sample videos, repeated under new ids), then per `--method` runs the engine alone on the job's
own inputs (the CPU stage's output, preprocessing excluded, after a warm-up call) and the job
once per `--gpu-actors` value with `--warmup`. Job throughput is the cost report's: rows over
the engines' span (first timed call's start to last call's end), so start-up and each engine's
warm-up batch stay out, waits on the CPU stage stay in. Reported beside it: job / engine, and
the engine's busy share of the span (its prefill and decode time, summed over rows). The whole
job's wall time (Ray start-up and model load included) is there too. On image jobs, where vLLM
imports, vLLM offline dense runs last on the same images (benchmarks/vllm_baseline.py --parquet):
each job row gets its ratio to it, per engine.
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

from benchmarks.workloads import load_model

SAMPLES = REPO / "jobs" / "sample_data"


def write_inputs(kind: str, rows: int, path: Path) -> None:
    if kind == "image":
        import numpy as np

        photos = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((896, 896)), dtype=np.int16)
                  for data in pq.read_table(SAMPLES / "images.parquet").column("image").to_pylist()]
        rng = np.random.default_rng(0)
        images = []
        for i in range(rows):  # every row its own image: nothing downstream can reuse another row's work
            noisy = photos[i % len(photos)] + rng.integers(-6, 7, (896, 896, 3))
            buffer = io.BytesIO()
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            images.append(buffer.getvalue())
        media = {"image": images}
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


def run_engine_alone(source: Path, kind: str, flags: list[str]) -> dict:
    """The engine by itself on the job's own inputs: the CPU stage's rows (made here, untimed), one
    warm-up call, then one timed `generate` over all of them with the job's settings."""
    import gc

    import torch

    from pipeline.cli import overrides, parser
    from pipeline.predict import Predictor
    from pipeline.preprocess import Preprocessor, from_columns
    from schemas import JobConfig

    config = JobConfig.load(overrides=overrides(parser("").parse_args(flags)))
    model_path = config.model.path or "embedded:tiny-qwen2_5_vl"
    stage = Preprocessor(model_path, kind, config.input, config.media, config.generation)
    rows = stage(pq.read_table(source)).to_pylist()
    predictor = Predictor(model_path, "engine-alone", config.model, config.sparsity, config.generation,
                          config.resources)
    predictor.loop.close()  # the engine is driven directly here
    engine = predictor.engine
    samples = [from_columns(row, kind, row["pixels"]) for row in rows if row["error"] is None]
    engine.generate(samples[:config.resources.batch_size], predictor.params)  # compile, capture: untimed
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = engine.generate(samples, predictor.params)
    seconds = time.perf_counter() - started
    generated = sum(r.stats.n_generated_tokens for r in results)
    del predictor, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"samples": len(samples), "seconds": seconds, "samples_per_s": len(samples) / seconds,
            "generated_tokens": generated}


def vllm_on_job_inputs(args, source: Path, question: str, max_new_tokens: int) -> dict:
    """vLLM offline dense on the job's own images, in a child process of this call (what users run
    instead of us: benchmarks/vllm_baseline.py)."""
    from benchmarks import vllm_baseline

    return vllm_baseline.rows_in_child("--model", args.model, "--parquet", str(source), "--prompt", question,
                                       "--max-new-tokens", str(max_new_tokens))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=["tiny", "qwen2_5_vl_7b"])
    parser.add_argument("--kind", default="video", choices=["image", "video"])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--gpu-actors", default="1", help="comma-separated engine counts, one run each")
    parser.add_argument("--cpu-actors-per-gpu", type=int, default=12,
                        help="decode/preprocess actors per engine: a cluster's GPU nodes bring their CPUs too")
    parser.add_argument("--gpus-per-actor", default="1", help="GPU share per engine: 0.5 runs two engines on "
                                                                 "each GPU (the multi-engine path on one GPU)")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--method", default="sparsevlm", help="comma-separated: none, sparsevlm, ...; one "
                                                                "engine-alone run and one job run each")
    parser.add_argument("--budget", default="128")
    parser.add_argument("--vision-fp8", action="store_true", help="the vision tower's GEMMs in FP8, in the job and "
                        "in the engine-alone run (model.vision_fp8)")
    parser.add_argument("--max-new-tokens", default=None, help="default: 16 for images (vqa), 64 for videos")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto", help="vLLM offline dense on the "
                        "same images after the job runs (auto: image jobs on the 7B architecture, where vllm imports)")
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
    from benchmarks.vllm_baseline import wanted
    from pipeline.cli import main as job_main
    from pipeline.cost.metrics import run_metrics

    with_vllm = wanted(args.vllm, applies=args.kind == "image" and args.model != "tiny")  # a wrong flag fails at once

    question = "What is in the picture? Answer in two words."
    task = ["--task", "vqa", "--prompt", question] if args.kind == "image" else ["--task", "caption"]
    new_tokens = args.max_new_tokens or ("16" if args.kind == "image" else "64")
    runs = []
    for method in args.method.split(","):
        flags = ["--method", method, "--max-new-tokens", new_tokens, "--num-frames", "16", *task, *model_arg,
                 *(["--vision-fp8"] if args.vision_fp8 else [])]
        if method != "none":
            flags += ["--budget", args.budget]
        engine_alone = run_engine_alone(source, args.kind, flags)
        print(f"{method}: engine alone {engine_alone['samples_per_s']:.2f} rows/s", flush=True)
        for actors in [int(n) for n in args.gpu_actors.split(",")]:
            output = Path(tempfile.mkdtemp(dir=work, prefix=f"out-{method}-{actors}-"))  # fresh: nothing to resume
            started = time.perf_counter()
            code = job_main(args.kind, "benchmark", base={},
                            argv=["--input", str(source), "--output", str(output), "--batch-size", args.batch_size,
                                  "--gpu-actors", str(actors), "--gpus-per-actor", args.gpus_per_actor,
                                  "--cpu-actors", str(args.cpu_actors_per_gpu * actors), "--warmup", *flags])
            job_seconds = time.perf_counter() - started
            table = pads.dataset(str(output), format="parquet").to_table()
            figures = run_metrics(table, gpu_hour_usd=1.0)
            per_engine = {worker: run_metrics(table.filter(pc.equal(table.column("worker"), worker)), 1.0)
                          for worker in pc.unique(table.column("worker")).to_pylist()}
            busy_s = sum(pc.sum(pc.fill_null(table.column(c), 0)).as_py() or 0
                         for c in ("vision_ms", "prefill_ms", "decode_ms")) / 1e3
            job_rate = figures.get("samples_per_s") or 0.0
            runs.append({"method": method, "gpu_actors": actors, "exit_code": code, "job_seconds": job_seconds,
                         "rows_per_s_job": len(table) / job_seconds, **figures, "engine_alone": engine_alone,
                         "job_vs_engine_alone": job_rate / (engine_alone["samples_per_s"] * actors),
                         "engine_busy_share": busy_s / (figures.get("span_s") or float("inf")) / actors,
                         "per_engine": {w: {k: m[k] for k in ("succeeded", "span_s", "samples_per_s")}
                                        for w, m in per_engine.items()}})
            if args.json:  # after every run: a call cut short still leaves its numbers
                args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "runs": runs}, indent=2))
            print(f"{method}, {actors} engine(s): {job_rate:.2f} rows/s over the engines' span "
                  f"({figures.get('span_s', 0):.1f}s; {runs[-1]['job_vs_engine_alone']:.0%} of the engine alone, "
                  f"busy {runs[-1]['engine_busy_share']:.0%}), job {job_seconds:.1f}s, errors {figures['errors']}",
                  flush=True)
    for run in runs:
        first = next(r for r in runs if r["method"] == run["method"])
        run["scaling_vs_first"] = run["samples_per_s"] / first["samples_per_s"] \
            if first.get("samples_per_s") and run.get("samples_per_s") else None
    dense = {r["gpu_actors"]: r["samples_per_s"] for r in runs if r["method"] == "none"}
    for run in runs:
        run["vs_dense_job"] = run["samples_per_s"] / dense[run["gpu_actors"]] if dense.get(run["gpu_actors"]) else None
    vllm = vllm_on_job_inputs(args, source, question, int(new_tokens)) if with_vllm else None
    for run in runs:
        run["vs_vllm_dense"] = run["samples_per_s"] / vllm["samples_per_s"] / run["gpu_actors"] \
            if vllm and run.get("samples_per_s") else None
    report = {"command": " ".join(["python", *sys.argv]), "model": args.model, "kind": args.kind,
              "rows": args.rows, "budget": args.budget, "runs": runs, "vllm_dense": vllm}
    print(f"\n{'method':<12} {'engines':>7} {'engine alone':>13} {'job':>8} {'job/engine':>10} {'busy':>6} "
          f"{'vs dense':>8} {'vs vLLM':>8}")
    fmt = lambda ratio: "-" if ratio is None else format(ratio, ".2f") + "x"  # noqa: E731
    for run in runs:
        print(f"{run['method']:<12} {run['gpu_actors']:>7} {run['engine_alone']['samples_per_s']:>13.2f} "
              f"{run['samples_per_s']:>8.2f} {run['job_vs_engine_alone']:>10.0%} {run['engine_busy_share']:>6.0%} "
              f"{fmt(run['vs_dense_job']):>8} {fmt(run['vs_vllm_dense']):>8}")
    if vllm:
        print(f"vLLM offline dense on the same images (one engine, its preprocessing included): "
              f"{vllm['samples_per_s']:.2f} rows/s")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
