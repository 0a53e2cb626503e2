"""Throughput: HF `generate` (dense, SDPA) vs our engine, dense and sparse, same process, same inputs.

    python -m benchmarks.throughput                                  # CPU, tiny model, seconds
    python -m benchmarks.throughput --model qwen2_5_vl_7b \
        --methods none,sparsevlm-128 --json benchmarks/results/h100_throughput.json   # GPU, minutes

HF runs identical samples stacked into batches (no padding: this flatters it) at each
`--hf-batch-sizes` and its best is the baseline. Our engine gets `--num-samples` distinct
samples in one `generate` call. Output length is fixed (EOS ignored) so both do the same
work. Preprocessing is excluded from both (it is the pipeline's CPU stage). Each timing
is the median of `--repeats` runs after a warm-up run. Where vLLM imports, its offline dense
rows (and EVS on video with `--vllm-evs`) follow in the same call, on the same workloads and
counts, from benchmarks/vllm_baseline.py: fresh media per run, its preprocessing included.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.workloads import (
    HF_BEST_BATCH, MIXED, MODEL_NAMES, WORKLOADS, default_count, device_for, load_model, make_mixed_samples,
    make_samples, stack_identical)

from benchmarks import vllm_baseline
from benchmarks.vllm_baseline import MIN_REPEATS, rows_in_child
from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up; also the last call's result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_hf(model, sample: dict, batch_size: int, max_new_tokens: int, repeats: int, device) -> dict:
    batch = {k: v.to(device) for k, v in stack_identical(sample, batch_size).items()}
    reset_peak(device)
    seconds, _ = timed(lambda: model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                              do_sample=False), device, repeats)
    return {"system": "hf_generate", "batch_size": batch_size, "seconds": seconds,
            "samples_per_s": batch_size / seconds, "peak_memory_gb": peak_memory_gb(device)}


VISION_FP8_RUNS = {"off": (False,), "on": (True,), "both": (False, True)}
FP8_SUFFIX = "@fp8"  # an engine row with FP8 vision GEMMs: system and method end in it
FUSE_QKV_RUNS = VISION_FP8_RUNS  # the same choices for EngineConfig.fuse_qkv
SEPARATE_QKV_SUFFIX = "@separate-qkv"  # an engine row with q, k and v as three GEMMs (not the default)
PREPARE_AHEAD_RUNS = VISION_FP8_RUNS  # the same choices for EngineConfig.prepare_ahead
PREPARED_FIRST_SUFFIX = "@prepared-first"  # an engine row whose samples were all prepared before its first pack
BATCHED_ATTENTION_RUNS = VISION_FP8_RUNS  # and for EngineConfig.batched_prefill_attention
VARLEN_ATTENTION_SUFFIX = "@varlen-attention"  # a CUDA engine row whose equal-length packs ran varlen attention


def run_engine(engine: VLMEngine, samples: list[dict], new_tokens: list[int], repeats: int,
               sparsity: SparsityConfig, static_batch: int | None = None) -> dict:
    """Continuous batching (one generate call), or `static_batch`: groups of that many samples,
    each group run to its slowest sample's end before the next starts (the old engine)."""
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in new_tokens]
    groups = [range(len(samples))] if not static_batch else \
        [range(i, min(i + static_batch, len(samples))) for i in range(0, len(samples), static_batch)]

    def run():
        return [r for g in groups for r in engine.generate([samples[i] for i in g], [params[i] for i in g],
                                                           sparsity=sparsity)]
    reset_peak(engine.device)
    seconds, results = timed(run, engine.device, repeats)
    stats = [r.stats for r in results]
    assert [s.n_generated_tokens for s in stats] == list(new_tokens)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    prefill_s = sum(s.prefill_ms for s in stats) / 1e3
    batching = f"static-{static_batch}" if static_batch else "continuous"
    vision_fp8, fuse_qkv, prepare_ahead = engine.config.vision_fp8, engine.config.fuse_qkv, engine.prepare_ahead
    batched_attention = engine.runner.backend.batched_prefill
    suffix = ("" if fuse_qkv else SEPARATE_QKV_SUFFIX) + ("" if prepare_ahead else PREPARED_FIRST_SUFFIX) + \
        (VARLEN_ATTENTION_SUFFIX if engine.device.type == "cuda" and not batched_attention else "") + \
        (FP8_SUFFIX if vision_fp8 else "")
    return {"system": f"engine_{sparsity.label}" + (f"_{batching}" if static_batch else "") + suffix,
            "method": sparsity.label + suffix, "vision_fp8": vision_fp8, "fuse_qkv": fuse_qkv,
            "prepare_ahead": prepare_ahead, "batched_prefill_attention": batched_attention, "batching": batching,
            "batch_size": len(samples),
            "seconds": seconds, "samples_per_s": len(samples) / seconds,
            "peak_memory_gb": peak_memory_gb(engine.device),
            "vision_s": sum(s.vision_ms for s in stats) / 1e3, "prefill_s": prefill_s,
            "sparse_s": sum(s.sparse_ms for s in stats) / 1e3,
            "sparse_share_of_prefill": sum(s.sparse_ms for s in stats) / 1e3 / prefill_s,
            "decode_s": sum(s.decode_ms for s in stats) / 1e3,
            "n_prompt_tokens": mean([s.n_prompt_tokens for s in stats]),
            "n_visual_tokens": mean([s.n_visual_tokens for s in stats]),
            "n_visual_tokens_kept_mean": mean([s.n_visual_tokens_kept for s in stats]),
            "equiv_visual_tokens_mean": mean([s.equiv_visual_tokens for s in stats]),
            "prefill_flops_ratio": sum(s.prefill_flops for s in stats) / sum(s.prefill_flops_dense for s in stats),
            "attention_backend": engine.backend.name}


def make_inputs(processor, name: str, count: int, model_name: str, frames: bool = False
                ) -> tuple[list[dict], list[int], object]:
    """A workload's samples (float patches, or uint8 frames), their new-token counts, and its
    Workload (None for `mixed`)."""
    if name == MIXED:
        samples, new_tokens = make_mixed_samples(processor, count, model_name, frames=frames)
        return samples, new_tokens, None
    workload = WORKLOADS[name]
    return (make_samples(processor, workload, count, model_name, frames=frames), [workload.max_new_tokens] * count,
            workload)


def hf_rows(args, model, name: str, inputs: tuple, device: torch.device) -> list[dict]:
    """HF `generate` at each of the workload's batch sizes (none on `mixed`)."""
    samples, _, workload = inputs
    sizes = args.hf_batch_sizes if args.hf_batch_sizes is not None else \
        ("1,4" if args.model == "tiny" else str(HF_BEST_BATCH[name]))
    rows = []
    for batch_size in [int(b) for b in sizes.split(",") if b and workload is not None]:
        try:
            row = run_hf(model, samples[0], batch_size, workload.max_new_tokens, args.repeats, device)
        except torch.cuda.OutOfMemoryError:  # HF's batch that does not fit is a result, not a crash
            torch.cuda.empty_cache()
            rows.append({"workload": name, "system": "hf_generate", "batch_size": batch_size,
                         "error": "CUDA out of memory"})
            print(f"{name:<13} hf_generate  batch {batch_size:>4}: out of memory", flush=True)
            continue
        rows.append({"workload": name, **row})
        print(f"{name:<13} hf_generate  batch {batch_size:>4}: {row['samples_per_s']:8.2f} samples/s", flush=True)
    return rows


def run_methods(args, engine: VLMEngine, name: str, inputs: tuple, methods: list[SparsityConfig],
                rows: list[dict]) -> None:
    """The engine's rows for one workload (static batching beside on `mixed`), appended to `rows`, once
    per `--prepare-ahead` and `--batched-prefill-attention` choice (the same engine: neither is
    compiled into it); ratios are against the same configuration's own dense and static rows."""
    samples, new_tokens, _ = inputs
    hf_best = max((r["samples_per_s"] for r in rows if r["workload"] == name and r["system"] == "hf_generate"
                   and "error" not in r), default=None)
    dense = {}
    for sparsity, prepare_ahead, batched in itertools.product(methods, PREPARE_AHEAD_RUNS[args.prepare_ahead],
                                                               BATCHED_ATTENTION_RUNS[args.batched_prefill_attention]):
        engine.prepare_ahead = prepare_ahead
        engine.runner.backend.batched_prefill = batched and engine.device.type == "cuda"  # as EngineConfig's
        configuration = (prepare_ahead, batched)
        if name == MIXED and args.static_batch:
            row = run_engine(engine, samples, new_tokens, args.repeats, sparsity, static_batch=args.static_batch)
            rows.append({"workload": name, **row})
            print(f"{name:<13} {row['system']:<26} batch {len(samples):>4}: {row['samples_per_s']:8.2f} samples/s",
                  flush=True)
        row = run_engine(engine, samples, new_tokens, args.repeats, sparsity)
        if sparsity.method == "none":
            dense[configuration] = row["samples_per_s"]
        static = [r for r in rows if r["workload"] == name and r.get("batching", "").startswith("static")
                  and r["method"] == row["method"]]
        row["speedup_vs_static"] = row["samples_per_s"] / static[-1]["samples_per_s"] if static else None
        row["speedup_vs_hf_best"] = row["samples_per_s"] / hf_best if hf_best else None
        row["speedup_vs_engine_dense"] = row["samples_per_s"] / dense[configuration] if configuration in dense else None
        rows.append({"workload": name, **row})
        print(f"{name:<13} {row['system']:<26} batch {len(samples):>4}: {row['samples_per_s']:8.2f} samples/s "
              f"(vision {row['vision_s']:.2f}s prefill {row['prefill_s']:.2f}s of which sparse "
              f"{row['sparse_s']:.3f}s, decode {row['decode_s']:.2f}s; kept {row['n_visual_tokens_kept_mean']:.0f}"
              f"/{row['n_visual_tokens']})", flush=True)


def vllm_rows(args, counts: dict[str, int]) -> list[dict]:
    """vLLM's rows on the same workloads and counts (benchmarks/vllm_baseline.py, in a child process;
    this process's model is gone by then)."""
    arguments = ["--model", args.model, "--workloads", ",".join(counts),
                 "--counts", ",".join(f"{k}={v}" for k, v in counts.items()),
                 "--repeats", str(max(args.repeats, MIN_REPEATS))]
    return rows_in_child(*arguments, *(["--evs", str(args.vllm_evs)] if args.vllm_evs else []),
                         *(["--fp8"] if args.vllm_fp8 else []))


def compare_with_vllm(rows: list[dict]) -> None:
    """Each engine row's speed against vLLM dense on its workload (and against vLLM FP8 where it ran)."""
    for row in rows:
        if row["system"].startswith("vllm") or "error" in row:
            continue
        for system in ("vllm_dense", "vllm_fp8"):
            base = next((r for r in rows if r["workload"] == row["workload"] and r["system"] == system), None)
            if base:
                row[f"speedup_vs_{system}"] = row["samples_per_s"] / base["samples_per_s"]


def write_report(args, device: torch.device, rows: list[dict], decode_ahead: bool) -> None:
    """`decode_ahead`: whether the engine queued decode steps ahead (as it took effect: off on the CPU)."""
    if not args.json:
        return
    report = {
        "command": " ".join(["python", *sys.argv]),
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "cuda_graphs": not args.no_cuda_graphs, "compile_vision": not args.no_compile_vision,
        "compile_decode": not args.no_compile_decode, "compile_prefill": not args.no_compile_prefill,
        "decode_ahead": decode_ahead, "fuse_qkv": args.fuse_qkv, "prepare_ahead": args.prepare_ahead,
        "batched_prefill_attention": args.batched_prefill_attention,
        "fused_vision": not args.no_fused_vision, "vision_fp8": args.vision_fp8, "pixels": args.pixels, "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=MODEL_NAMES)
    parser.add_argument("--workloads", default="vqa-1024,caption-1024")
    parser.add_argument("--num-samples", type=int, default=None, help="engine samples per workload "
                        "(default: 16 on tiny, 128 for VQA and 64 otherwise on 7B)")
    parser.add_argument("--hf-batch-sizes", default=None, help="comma list (default 1,4 tiny; on 7B the "
                        "anchors' best batch of each workload; empty: skip HF)")
    parser.add_argument("--methods", default="none,sparsevlm-128",
                        help="sparsity labels (sparsevlm/config.py: none, sparsevlm-128, fastv-r0.25, ...), comma "
                             "separated; separate by ';' when a label holds a schedule's commas")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--static-batch", type=int, default=64, help="on `mixed`, also run static batching in "
                        "groups of this many (0: skip), beside continuous batching with as many seats")
    parser.add_argument("--pixels", choices=("patches", "frames"), default="patches", help="what the engine is "
                        "handed: the processor's float patches, or its resized uint8 frames as the pipeline hands "
                        "them (normalised and patchified on the device, inside the timed call)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-compile-vision", action="store_true")
    parser.add_argument("--no-compile-decode", action="store_true", help="decode steps through the decoder "
                        "layers as loaded (not torch.compile'd)")
    parser.add_argument("--no-compile-prefill", action="store_true", help="prefill packs through the "
                        "decoder layers as loaded (EngineConfig.compile_prefill off)")
    parser.add_argument("--no-decode-ahead", action="store_true", help="one decode step at a time, each queued "
                        "after the host read the previous one's tokens (EngineConfig.decode_ahead off)")
    parser.add_argument("--fuse-qkv", choices=tuple(FUSE_QKV_RUNS), default="on",
                        help="q, k and v as one GEMM in the decoder (EngineConfig.fuse_qkv, on by default); off: "
                        f"three GEMMs (rows' method ends in {SEPARATE_QKV_SUFFIX}); both: three, then one, in one call")
    parser.add_argument("--prepare-ahead", choices=tuple(PREPARE_AHEAD_RUNS), default="on",
                        help="generate prepares samples on a worker thread while earlier packs run "
                        "(EngineConfig.prepare_ahead, the CUDA default); off: all before the first pack (rows' method "
                        f"ends in {PREPARED_FIRST_SUFFIX}); both: off, then on, on the same engine in one call")
    parser.add_argument("--batched-prefill-attention", choices=tuple(BATCHED_ATTENTION_RUNS), default="on",
                        help="equal-length prefill packs' attention as one batched cuDNN call "
                        "(EngineConfig.batched_prefill_attention, the default; CUDA only, the CPU engine runs "
                        f"SDPA per sample); off: the varlen call (rows' method ends in {VARLEN_ATTENTION_SUFFIX}); "
                        "both: off, then on, on the same engine in one call")
    parser.add_argument("--no-fused-vision", action="store_true", help="transformers' own tower modules (the "
                        "window kernel and GEMM patch embedding off)")
    parser.add_argument("--vision-fp8", choices=tuple(VISION_FP8_RUNS), nargs="?", const="on", default="off",
                        help="the vision tower's linear layers in FP8 (EngineConfig.vision_fp8; changes the numbers: "
                        "see benchmarks/fp8_accuracy.py); both: the model's precision, then FP8 (rows end in @fp8)")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto", help="vLLM offline dense rows in "
                        "the same call (auto: when vllm imports and the model is a real architecture)")
    parser.add_argument("--vllm-evs", type=float, default=None, help="also vLLM with EVS video pruning at this "
                        "rate, on video workloads (e.g. 0.75)")
    parser.add_argument("--vllm-fp8", action="store_true", help="also vLLM with its own FP8 quantization (the "
                        "fair partner of --vision-fp8; it quantizes the language model too)")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    tiny = args.model == "tiny"
    if args.pixels == "frames" and args.hf_batch_sizes != "":
        parser.error('--pixels frames: HF generate takes the processor\'s float patches; pass --hf-batch-sizes ""')
    with_vllm = vllm_baseline.wanted(args.vllm, applies=not tiny)  # before the run: a wrong flag fails at once
    device = device_for(args.model)
    if args.batched_prefill_attention == "both" and device.type != "cuda":
        parser.error("--batched-prefill-attention both: the batched path is CUDA only (the CPU engine runs SDPA "
                     "per sample either way)")
    model, processor = load_model(args.model, str(device))
    seats = args.static_batch if args.static_batch and MIXED in args.workloads.split(",") else 128
    methods = [SparsityConfig.parse(m) for m in args.methods.split(";" if ";" in args.methods else ",")]
    rows, counts, inputs = [], {}, {}
    ahead = False if args.no_decode_ahead else None  # None: the engine's default (on CUDA only)
    for vision_fp8, fuse_qkv in itertools.product(VISION_FP8_RUNS[args.vision_fp8], FUSE_QKV_RUNS[args.fuse_qkv]):
        engine = VLMEngine(model, processor, engine_config=EngineConfig(cuda_graphs=not args.no_cuda_graphs,
                                                                        compile_vision=not args.no_compile_vision,
                                                                        compile_decode=not args.no_compile_decode,
                                                                        compile_prefill=not args.no_compile_prefill,
                                                                        decode_ahead=ahead,
                                                                        fuse_qkv=fuse_qkv,
                                                                        fused_vision=not args.no_fused_vision,
                                                                        vision_fp8=vision_fp8, max_num_seqs=seats))
        decode_ahead = engine.runner.decoder.ahead
        for name in args.workloads.split(","):
            if name not in inputs:  # made once: every configuration sees the same samples
                counts[name] = args.num_samples or default_count(name, tiny)
                inputs[name] = make_inputs(processor, name, counts[name], args.model, frames=args.pixels == "frames")
                rows += hf_rows(args, model, name, inputs[name], device)
            run_methods(args, engine, name, inputs[name], methods, rows)
            write_report(args, device, rows, decode_ahead)  # after every workload: a cut run keeps its numbers
        del engine  # its KV pool and graphs leave before the next precision's engine sizes its own
        gc.collect()
        torch.cuda.empty_cache()

    if with_vllm:
        del model  # vLLM gets the whole GPU, in a child process of this same call
        gc.collect()
        torch.cuda.empty_cache()
        rows += vllm_rows(args, counts)
        compare_with_vllm(rows)
        write_report(args, device, rows, decode_ahead)

    print(f"\n{'workload':<13} {'system':<26} {'batch':>5} {'samples/s':>10} {'x HF best':>10} {'x dense':>8} "
          f"{'x vLLM':>8} {'sparse %':>8} {'peak GB':>8}")
    for row in (r for r in rows if "error" not in r):
        fmt = lambda value, width, spec: f"{'-' if value is None else format(value, spec):>{width}}"  # noqa: E731
        share = row.get("sparse_share_of_prefill")
        print(f"{row['workload']:<13} {row['system']:<26} {row['batch_size']:>5} {row['samples_per_s']:>10.2f} "
              f"{fmt(row.get('speedup_vs_hf_best'), 10, '.2f')} {fmt(row.get('speedup_vs_engine_dense'), 8, '.2f')} "
              f"{fmt(row.get('speedup_vs_vllm_dense'), 8, '.2f')} "
              f"{fmt(None if share is None else 100 * share, 8, '.2f')} {fmt(row.get('peak_memory_gb'), 8, '.1f')}")
    write_report(args, device, rows, decode_ahead)
    rounded = lambda value: value and round(value, 2)  # noqa: E731
    print(json.dumps({"summary": {f"{r['workload']} {r['method']}": {
        "vs_hf_best": rounded(r["speedup_vs_hf_best"]), "vs_engine_dense": rounded(r["speedup_vs_engine_dense"]),
        "vs_static_batching": rounded(r["speedup_vs_static"]), "vs_vllm_dense": rounded(r.get("speedup_vs_vllm_dense"))}
        for r in rows if r.get("batching") == "continuous"}}))


if __name__ == "__main__":
    main()
