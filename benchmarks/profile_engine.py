"""Where the engine's time goes: torch.profiler over one `generate` call, top ops by device time.

    python -m benchmarks.profile_engine                                       # CPU, tiny model
    python -m benchmarks.profile_engine --model qwen2_5_vl_7b --workload vqa-1024 \
        --num-samples 32 --method sparsevlm-128 --trace /tmp/trace.json        # GPU

Prints the phase split from the engine's own stats, then the profiler's table. On CUDA,
`--gaps` also finds where the device sat idle (no kernel or copy running) between its first and
last kernel, and which Python functions of ours the host was in meanwhile (the profile records
Python stacks for this, which slows the host: the gaps are upper bounds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from benchmarks.workloads import WORKLOADS, device_for, load_model, make_samples

from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_gaps(trace: dict, min_us: float = 50.0) -> list[tuple[float, float]]:
    """(start, end) µs of each interval over `min_us` in which no kernel or copy ran."""
    busy = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                  if e.get("cat") in DEVICE_CATEGORIES and "dur" in e)
    gaps, reach = [], busy[0][1] if busy else 0.0
    for start, end in busy[1:]:
        if start - reach > min_us:
            gaps.append((reach, start))
        reach = max(reach, end)
    return gaps


def host_during(trace: dict, gaps: list[tuple[float, float]], ours: tuple[str, ...]) -> dict[str, float]:
    """µs of the gaps that each of our Python functions (path containing one of `ours`) overlapped."""
    overlap: dict[str, float] = defaultdict(float)
    for e in trace["traceEvents"]:
        if e.get("cat") != "python_function" or not any(part in e.get("name", "") for part in ours):
            continue
        start, end = e["ts"], e["ts"] + e.get("dur", 0)
        for gap_start, gap_end in gaps:
            if gap_start < end and start < gap_end:
                overlap[e["name"]] += min(end, gap_end) - max(start, gap_start)
    return dict(sorted(overlap.items(), key=lambda item: -item[1]))


def print_gaps(trace: dict, rows: int) -> None:
    gaps = device_gaps(trace)
    device = [e for e in trace["traceEvents"] if e.get("cat") in DEVICE_CATEGORIES and "dur" in e]
    span = max(e["ts"] + e["dur"] for e in device) - min(e["ts"] for e in device)
    idle = sum(end - start for start, end in gaps)
    print(f"\ndevice idle: {idle / 1e3:.1f} ms of {span / 1e3:.1f} ms in {len(gaps)} gaps over 50 us "
          f"(largest {max((b - a for a, b in gaps), default=0) / 1e3:.2f} ms)")
    print(f"{'our function (host) during the gaps':<100}{'ms':>8}")
    for name, us in list(host_during(trace, gaps, ("sparsevlm/", "kernels/")).items())[:rows]:
        print(f"{name[:98]:<100}{us / 1e3:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "qwen2_5_vl_7b"])
    parser.add_argument("--workload", default="vqa-1024", choices=sorted(WORKLOADS))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--method", default="none", help="none, METHOD-PRESET or METHOD-rRATIO")
    parser.add_argument("--rows", type=int, default=30, help="profiler table rows")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    parser.add_argument("--no-compile-prefill", action="store_true", help="EngineConfig.compile_prefill off")
    parser.add_argument("--vision-fp8", action="store_true", help="EngineConfig.vision_fp8")
    parser.add_argument("--no-fuse-qkv", action="store_true", help="q, k and v as three GEMMs "
                        "(EngineConfig.fuse_qkv off)")
    parser.add_argument("--gaps", action="store_true", help="CUDA: where the device idles, and what the host does")
    args = parser.parse_args()

    device = device_for(args.model)
    model, processor = load_model(args.model, str(device))
    engine = VLMEngine(model, processor, engine_config=EngineConfig(compile_prefill=not args.no_compile_prefill,
                                                                    vision_fp8=args.vision_fp8,
                                                                    fuse_qkv=not args.no_fuse_qkv))
    workload = WORKLOADS[args.workload]
    samples = make_samples(processor, workload, args.num_samples, args.model)
    params = SamplingParams(max_new_tokens=workload.max_new_tokens, ignore_eos=True)
    sparsity = SparsityConfig.parse(args.method)
    engine.generate(samples, params, sparsity=sparsity)  # warm-up: compile, capture graphs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=args.gaps) as prof:
        results = engine.generate(samples, params, sparsity=sparsity)
    total = lambda name: sum(getattr(r.stats, name) for r in results) / 1e3  # noqa: E731
    print(f"{args.workload} x{args.num_samples} {sparsity.label}: vision {total('vision_ms'):.3f}s, prefill "
          f"{total('prefill_ms'):.3f}s (sparse {total('sparse_ms'):.3f}s), decode {total('decode_ms'):.3f}s "
          "(profiled, so slower than a clean run)")
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    if args.trace or args.gaps:
        path = args.trace or Path(tempfile.mkdtemp()) / "trace.json"
        prof.export_chrome_trace(str(path))
        if args.gaps and device.type == "cuda":
            print_gaps(json.loads(path.read_text()), args.rows)


if __name__ == "__main__":
    main()
