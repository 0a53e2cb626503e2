"""The video-captioning job through Ray, end to end, on a model of benchmark size.

    python benchmarks/job_throughput.py --model qwen2_5_vl_7b --rows 96 --json out.json   # GPU

Writes a random-weight checkpoint of the model (the 7B architecture: ~16 GB) and a Parquet
of `--rows` videos (the shipped sample videos, repeated under new ids), runs
`jobs/caption_videos.py`'s pipeline on them, and reports rows/s over the whole job (Ray
start-up and model load included) and over the engine's own time (sum of vision, prefill
and decode per row, i.e. what one GPU spends per video).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline.cli import main as job_main  # noqa: E402
from workloads import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=["tiny", "qwen2_5_vl_7b"])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--method", default="sparsevlm")
    parser.add_argument("--budget", default="128")
    parser.add_argument("--max-new-tokens", default="64")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    checkpoint = work / "model"
    if args.model == "tiny":
        model_arg = []
    else:
        import torch

        model, _ = load_model(args.model, "cuda", folder=checkpoint)
        model.save_pretrained(checkpoint)
        del model
        torch.cuda.empty_cache()
        model_arg = ["--model", str(checkpoint)]
    videos = pq.read_table(REPO / "jobs" / "sample_data" / "videos.parquet").column("video").to_pylist()
    source = work / "videos.parquet"
    pq.write_table(pa.table({"id": [f"v{i:05d}" for i in range(args.rows)],
                             "video": [videos[i % len(videos)] for i in range(args.rows)]}), source)
    output = work / "captions"
    started = time.perf_counter()
    code = job_main("video", "benchmark", base={"generation": {"task": "caption"}},
                    argv=["--input", str(source), "--output", str(output), "--method", args.method,
                          "--budget", args.budget, "--max-new-tokens", args.max_new_tokens, "--num-frames", "16",
                          "--batch-size", "96", *model_arg])
    elapsed = time.perf_counter() - started
    table = pads.dataset(str(output), format="parquet").to_table()
    engine_s = sum(pc.sum(table.column(c)).as_py() or 0 for c in ("vision_ms", "prefill_ms", "decode_ms")) / 1e3
    report = {"command": " ".join(["python", *sys.argv]), "model": args.model, "rows": len(table),
              "errors": len(table) - table.column("error").null_count,
              "job_seconds": elapsed, "rows_per_s_job": len(table) / elapsed,
              "engine_seconds": engine_s, "rows_per_s_engine": len(table) / engine_s if engine_s else None,
              "n_visual_tokens_mean": pc.mean(table.column("n_visual_tokens")).as_py(),
              "n_visual_tokens_kept_mean": pc.mean(table.column("n_visual_tokens_kept")).as_py(), "exit_code": code}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
