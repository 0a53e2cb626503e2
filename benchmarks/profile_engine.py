"""Where the engine's time goes: torch.profiler over one `generate` call, top ops by device time.

    python -m benchmarks.profile_engine                                       # CPU, tiny model
    python -m benchmarks.profile_engine --model qwen2_5_vl_7b --workload vqa-1024 \
        --num-samples 32 --method sparsevlm-128 --trace /tmp/trace.json        # GPU

Prints the phase split from the engine's own stats, then the profiler's table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from benchmarks.workloads import WORKLOADS, device_for, load_model, make_samples

from sparsevlm import EngineConfig, SamplingParams, SparsityConfig, VLMEngine


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
    args = parser.parse_args()

    device = device_for(args.model)
    model, processor = load_model(args.model, str(device))
    engine = VLMEngine(model, processor, engine_config=EngineConfig(compile_prefill=not args.no_compile_prefill,
                                                                    vision_fp8=args.vision_fp8))
    workload = WORKLOADS[args.workload]
    samples = make_samples(processor, workload, args.num_samples, args.model)
    params = SamplingParams(max_new_tokens=workload.max_new_tokens, ignore_eos=True)
    sparsity = SparsityConfig.parse(args.method)
    engine.generate(samples, params, sparsity=sparsity)  # warm-up: compile, capture graphs
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        results = engine.generate(samples, params, sparsity=sparsity)
    total = lambda name: sum(getattr(r.stats, name) for r in results) / 1e3  # noqa: E731
    print(f"{args.workload} x{args.num_samples} {sparsity.label}: vision {total('vision_ms'):.3f}s, prefill "
          f"{total('prefill_ms'):.3f}s (sparse {total('sparse_ms'):.3f}s), decode {total('decode_ms'):.3f}s "
          "(profiled, so slower than a clean run)")
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
