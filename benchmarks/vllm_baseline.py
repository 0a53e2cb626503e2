"""vLLM offline, dense: what users run instead of us, timed on our benchmark workloads.

Optional: it runs where `vllm` imports (../shared/device/stage-vllm.sh carries vLLM 0.26 to the
GPU machine) and is never a dependency of the product. `benchmarks/throughput.py` runs it in the
same call as our engine, in a child process once our model has left the GPU. Measured the way
BENCHMARKS.md asks, so that its numbers are the ones a user would get:
- prefix caching off, the multimodal processor cache off, and fresh media in every run
  (repeated media let vLLM reuse its encoder and prefix caches: 1.5-2x inflated, seen on the H200);
- its own preprocessing included (PIL images and uint8 frames in, as a user hands them over;
  our engine's rows exclude the CPU stage);
- a fixed output length (EOS ignored, min_tokens = max_tokens), as in our rows;
- the median of >= 3 timed runs after one warm-up run (CUDA graphs, compilation).
The first timed run sees exactly the images our engine's rows see (seeds 0..n-1); each later run
draws new ones. `--evs R` adds vLLM's own video token pruning (EVS) at rate R on video workloads.
`--parquet` runs it on a job's own input images instead (benchmarks/job_throughput.py does): the
rows split in four, a warm-up on the first quarter and one timed run on each other quarter, so
no run sees an image twice; JPEG decoding happens before the clock, as in a job's CPU stage.

    python -m benchmarks.vllm_baseline --model qwen2_5_vl_7b --workloads vqa-1024,video-16f --evs 0.75 --json OUT
    python -m benchmarks.vllm_baseline --parquet inputs.parquet --prompt "What is in the picture?" \
        --max-new-tokens 16 --json OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.workloads import (
    LARGE_MODELS, MIXED, QUESTION, WORKLOADS, default_count, load_processor, mixed_plan, prompt_for, random_media,
    write_model_folder)

MIN_REPEATS = 3
RUN_SEED_STRIDE = 1_000_003  # media seeds of timed run r start at r * this: no image repeats across runs
WARMUP_SEED = 10**9
VIDEO_FPS = 2.0  # the frames stand for a clip sampled at 2 fps, as our processors assume


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def plan_for(workload_name: str, count: int) -> list[tuple]:
    """(workload of the media, seed offset within the run, new tokens) per request."""
    if workload_name == MIXED:
        return mixed_plan(count)
    workload = WORKLOADS[workload_name]
    return [(workload, i, workload.max_new_tokens) for i in range(count)]


def requests_for(processor, plan: list[tuple], first_seed: int) -> list[dict]:
    """vLLM prompts: the chat prompt with one placeholder, the media as PIL image or uint8 frames."""
    requests = []
    for workload, seed, _ in plan:
        media = random_media(workload, first_seed + seed)
        data = {"video": video_item(np.stack([np.asarray(f) for f in media]))} if workload.is_video else {"image": media}
        requests.append({"prompt": prompt_for(processor, workload), "multi_modal_data": data})
    return requests


def video_item(frames: np.ndarray, fps: float = VIDEO_FPS) -> tuple[np.ndarray, dict]:
    """uint8 (T, H, W, 3) frames with the metadata vLLM's Qwen3-VL requires (frames already sampled;
    models that need none drop it)."""
    count = frames.shape[0]
    return frames, {"fps": fps, "frames_indices": list(range(count)), "total_num_frames": count,
                    "duration": count / fps, "do_sample_frames": False}


def timed_generate(llm, requests: list[dict], params: list, new_tokens: list[int]) -> float:
    """Seconds of one `generate` over `requests`; an error, not a row, if any stopped short."""
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = [len(output.outputs[0].token_ids) for output in outputs]
    if generated != new_tokens:
        raise RuntimeError(f"vLLM stopped short: generated {generated[:8]}... tokens, asked for {new_tokens[:8]}...; "
                           "the row would not do our rows' work")
    return seconds


def fixed_length(sampling_params_cls, new_tokens: list[int]) -> list:
    return [sampling_params_cls(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0) for n in new_tokens]


def timing_row(count: int, times: list[float], preprocessing: str) -> dict:
    seconds = statistics.median(times)
    return {"batch_size": count, "seconds": seconds, "samples_per_s": count / seconds, "runs_s": times,
            "preprocessing": preprocessing, "prefix_caching": False, "fresh_media_per_run": True}


def measure(llm, sampling_params_cls, processor, workload_name: str, count: int, repeats: int = MIN_REPEATS) -> dict:
    """Seconds per run (median of `repeats` >= 3 runs on fresh media, after a warm-up run)."""
    plan = plan_for(workload_name, count)
    new_tokens = [n for *_, n in plan]
    params = fixed_length(sampling_params_cls, new_tokens)
    # media are made outside the clock, decoded and processed inside it
    run = lambda first_seed: timed_generate(llm, requests_for(processor, plan, first_seed), params, new_tokens)  # noqa: E731
    run(WARMUP_SEED)
    times = [run(r * RUN_SEED_STRIDE) for r in range(max(repeats, MIN_REPEATS))]
    return timing_row(count, times, "included (vLLM's own)")


def measure_parquet(llm, sampling_params_cls, processor, path: Path, question: str, max_new_tokens: int) -> dict:
    """vLLM on a job's input images: a warm-up on the first quarter of the rows, then a timed run on
    each of the other three (median), so that every run sees images it has not seen."""
    import pyarrow.parquet as pq
    from PIL import Image

    images = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    quarter = len(images) // 4
    if quarter == 0:
        raise SystemExit(f"{path}: {len(images)} rows; vLLM's job baseline needs at least 4 (one per run)")
    prompt = prompt_for(processor, WORKLOADS["vqa-1024"], question)
    new_tokens = [max_new_tokens] * quarter
    params = fixed_length(sampling_params_cls, new_tokens)

    def run(part: int) -> float:
        requests = [{"prompt": prompt, "multi_modal_data": {"image": Image.open(io.BytesIO(data)).convert("RGB")}}
                    for data in images[part * quarter:(part + 1) * quarter]]
        return timed_generate(llm, requests, params, new_tokens)

    run(0)
    times = [run(part) for part in (1, 2, 3)]
    return {"workload": f"job:{path.name}", "system": "vllm_dense",
            **timing_row(quarter, times, "included (vLLM's own; JPEG decoding excluded)")}


def engine_kwargs(folder: Path, evs: float | None, max_num_seqs: int, video: bool = True,
                  quantization: str | None = None) -> dict:
    """vLLM's engine arguments; only the modalities the run uses (LLaVA-1.5 has no video);
    `quantization` "fp8": its dynamic FP8 (e4m3 weights and activations) on every linear layer it quantizes."""
    limits = {"image": 1, "video": 1} if video else {"image": 1}
    kwargs = dict(model=str(folder), load_format="dummy", dtype="bfloat16", enable_prefix_caching=False,
                  mm_processor_cache_gb=0, limit_mm_per_prompt=limits, max_num_seqs=max_num_seqs, seed=0)
    if evs:
        kwargs["video_pruning_rate"] = evs
    if quantization:
        kwargs["quantization"] = quantization
    return kwargs


def model_folder(model_name: str) -> tuple[Path, object]:
    """A weight-free folder of the architecture (vLLM loads it with dummy weights) and our processor."""
    if model_name not in LARGE_MODELS:
        raise SystemExit(f"vLLM runs the real architectures ({', '.join(LARGE_MODELS)}), not {model_name!r}")
    folder = Path(tempfile.mkdtemp()) / model_name
    write_model_folder(model_name, folder)
    return folder, load_processor(model_name, folder)


def run(model_name: str, workloads: list[str], counts: dict[str, int], repeats: int, evs: float | None,
        max_num_seqs: int = 256, fp8: bool = False) -> list[dict]:
    """vLLM's rows for `workloads`: dense, with EVS at `evs` on the video workloads, and with `fp8`
    its FP8 quantization (system vllm_fp8)."""
    from vllm import LLM, SamplingParams

    folder, processor = model_folder(model_name)
    variants = [("vllm_dense", None, None)] + ([(f"vllm_evs{evs:g}", evs, None)] if evs else []) + \
        ([("vllm_fp8", None, "fp8")] if fp8 else [])
    rows = []
    for system, rate, quantization in variants:
        names = [w for w in workloads if rate is None or (w != MIXED and WORKLOADS[w].is_video)]
        if not names:
            continue
        video = any(name == MIXED or WORKLOADS[name].is_video for name in names)
        try:
            llm = LLM(**engine_kwargs(folder, rate, max_num_seqs, video, quantization))
        except ImportError as error:  # a staged vLLM without an optional package: the other variants' rows stay
            print(f"{system}: not measured, vLLM could not build it ({error})", file=sys.stderr, flush=True)
            continue
        for name in names:
            row = {"workload": name, "system": system, **measure(llm, SamplingParams, processor, name, counts[name],
                                                                 repeats)}
            rows.append(row)
            print_row(row)
        del llm
    return rows


def run_parquet(model_name: str, path: Path, question: str, max_new_tokens: int, max_num_seqs: int = 256) -> dict:
    """vLLM dense's row on a job's input images."""
    from vllm import LLM, SamplingParams

    folder, processor = model_folder(model_name)
    row = measure_parquet(LLM(**engine_kwargs(folder, None, max_num_seqs, video=False)), SamplingParams, processor, path,
                          question, max_new_tokens)
    print_row(row)
    return row


def print_row(row: dict) -> None:
    print(f"{row['workload']:<13} {row['system']:<22} batch {row['batch_size']:>4}: {row['samples_per_s']:8.2f} "
          f"samples/s (runs {', '.join(f'{t:.2f}s' for t in row['runs_s'])}; its preprocessing included)", flush=True)


def wanted(mode: str, applies: bool) -> bool:
    """Whether a benchmark adds vLLM rows: `mode` auto|on|off; `applies`: the run is one vLLM can do."""
    if mode == "off" or (mode == "auto" and not (applies and vllm_available())):
        return False
    if not applies:
        raise SystemExit("--vllm on needs a real architecture (--model qwen2_5_vl_7b, ...) and, for jobs, images")
    if not vllm_available():
        raise SystemExit("--vllm on: vllm is not importable (../shared/device/stage-vllm.sh stages it)")
    return True


def rows_in_child(*arguments: str) -> list[dict]:
    """This module's rows, run in a child process (its own CUDA context and engine processes): the
    callers' benchmarks free the GPU first and run vLLM in the same call."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "vllm.json"
        subprocess.run([sys.executable, "-m", "benchmarks.vllm_baseline", *arguments, "--json", str(out)], check=True)
        return json.loads(out.read_text())["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=list(LARGE_MODELS))
    parser.add_argument("--workloads", default="vqa-1024,caption-1024,video-16f")
    parser.add_argument("--counts", default="", help="workload=n,... (default: 128 for VQA, 64 otherwise, "
                        "256 for mixed: throughput.py's)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--evs", type=float, default=None, help="also run vLLM's EVS video pruning at this rate")
    parser.add_argument("--fp8", action="store_true", help="also run vLLM with its FP8 quantization (every linear "
                        "layer it quantizes, the language model's included)")
    parser.add_argument("--parquet", type=Path, help="a job's input Parquet (an `image` column of encoded "
                        "images): time vLLM on those images instead of the workloads")
    parser.add_argument("--prompt", default=QUESTION, help="with --parquet: the job's question")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="with --parquet")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not vllm_available():
        raise SystemExit("vllm is not importable here: ../shared/device/stage-vllm.sh stages it for the GPU machine")
    if args.parquet:
        rows = [run_parquet(args.model, args.parquet, args.prompt, args.max_new_tokens)]
    else:
        workloads = args.workloads.split(",")
        counts = {w: default_count(w, tiny=False) for w in workloads}
        counts.update({k: int(v) for k, v in (item.split("=") for item in args.counts.split(",") if item)})
        rows = run(args.model, workloads, counts, args.repeats, args.evs, fp8=args.fp8)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python -m benchmarks.vllm_baseline", *sys.argv[1:]]),
                                         "model": args.model, "vllm": __import__("vllm").__version__,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
