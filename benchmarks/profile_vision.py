"""The vision tower alone, as the engine runs it: ms per image, its share of the FLOP limit, and
where the device time goes (GEMMs, attention, elementwise, copies, host gaps).

    python -m benchmarks.profile_vision --model qwen2_5_vl_7b --images 32 --json OUT.json     # GPU

Any of the 7B architectures (`--model`: Qwen2.5-VL's windowed tower, Qwen3-VL's, LLaVA-1.5's CLIP,
LLaVA-OneVision's SigLIP over its tiles); the FLOP limit's share comes from the tower's matrix
FLOPs counted by torch (`tower_work`), not from a formula per family.

Each variant (`--variants`) is timed in the same process on the same images: median of
`--repeats` calls of `adapter.encode_visual` over one pack after a warm-up (compilation
excluded), then profiled once with torch.profiler. Kernel names are sorted into coarse
classes; "host gap" is wall time minus device-busy time (the GPU waiting on Python).
Variants: `engine` (what the engine runs: blocks compiled, window kernel, GEMM patch
embedding), `unfused` (compiled blocks over transformers' own modules: the engine before the
fused path), `eager` (transformers' modules, no torch.compile), `fp8` (`engine` with the
linear layers in FP8, `EngineConfig.vision_fp8`; its share is still of the bf16 limit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.workloads import LARGE_MODELS, WORKLOADS, device_for, load_model, make_samples
from sparsevlm import EngineConfig, VLMEngine

H200_BF16_TFLOPS = 790.0  # dense bf16 matrix rate seen on the lent H200 (device README)
KERNEL_CLASSES = (  # first match wins, on the lower-cased kernel name
    ("window kernel", ("_window_attention_kernel",)),
    ("fp8 quantisation (ours)", ("_quantize_rows_kernel", "_swiglu_quantize_kernel")),
    ("fused elementwise (triton)", ("triton_",)),  # inductor's kernels, named after what they fuse ("addmm")
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("patch embedding conv", ("convolve",)),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "matmul")),
    ("copy / cast", ("copy", "cast", "cat", "memcpy", "memset", "index", "gather", "scatter")),
    ("elementwise / norm / reduce", ("elementwise", "reduce", "norm", "vectorized", "unrolled", "softmax")),
)


def tower_work(model, processor, sample: dict) -> tuple[float, int]:
    """(matrix FLOPs, vision patches) of one sample through the tower and projector: the FLOPs of
    GEMMs, convolutions and attention, counted by torch's FlopCounterMode over the model's own
    modules (no compile, no fused path, SDPA per segment): one definition for every family."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    engine = VLMEngine(model, processor, engine_config=EngineConfig(
        max_cache_tokens=4096, cuda_graphs=False, compile_vision=False, compile_decode=False, fused_vision=False,
        attention_backend="sdpa"))
    prepared = [engine.prepare(sample, 0)]
    # SDPA's math backend: plain matmuls the counter knows on every device (its fused CPU kernel it does not)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        engine.adapter.encode_visual(prepared, engine.runner.backend)
    return float(counter.get_total_flops()), prepared[0].num_vision_patches


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def profile_once(run, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize(device)
    wall_ms = 1e3 * (time.perf_counter() - started)
    by_class: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.device_time / 1e3 if hasattr(event, "device_time") else event.cuda_time / 1e3
            by_class[kernel_class(event.name)] = by_class.get(kernel_class(event.name), 0.0) + ms
            kernels[event.name] = kernels.get(event.name, 0.0) + ms
    busy = sum(by_class.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"profiled_wall_ms": wall_ms, "device_busy_ms": busy, "host_gap_ms": max(0.0, wall_ms - busy),
            "by_class_ms": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": [{"name": n[:120], "ms": round(ms, 3)} for n, ms in top]}


def measure(engine: VLMEngine, samples: list[dict], repeats: int) -> tuple[float, dict]:
    device = engine.device
    adapter, backend = engine.adapter, engine.runner.backend
    prepared = [engine.prepare(s, i) for i, s in enumerate(samples)]
    for sample in prepared:  # the engine uploads on a side stream while earlier work runs: not the tower's time
        adapter.start_upload(sample)

    def run():
        with torch.inference_mode():
            return adapter.encode_visual(prepared, backend)

    run()
    run()  # compile and autotune both out of the timing
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), profile_once(run, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_5_vl_7b", choices=sorted(LARGE_MODELS))
    parser.add_argument("--workload", default="vqa-1024", choices=sorted(WORKLOADS))
    parser.add_argument("--images", type=int, default=32, help="images (videos) in the one pack")
    parser.add_argument("--variants", default="unfused,engine,eager")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = device_for(args.model)
    if device.type != "cuda":
        raise SystemExit("profile_vision needs a CUDA device")
    model, processor = load_model(args.model, str(device))
    samples = make_samples(processor, WORKLOADS[args.workload], args.images, args.model)
    flops, patches = tower_work(model, processor, samples[0])  # the workload's images (videos) are all one size
    rows = []
    for variant in args.variants.split(","):
        small = dict(max_cache_tokens=4096, cuda_graphs=False)  # the tower alone needs no KV pool or graphs
        if variant not in ("engine", "unfused", "eager", "fp8"):
            parser.error(f"unknown variant {variant!r}: engine, unfused, eager or fp8")
        config = EngineConfig(**small, compile_vision=variant != "eager", fused_vision=variant in ("engine", "fp8"),
                              vision_fp8=variant == "fp8")
        engine = VLMEngine(model, processor, engine_config=config)
        seconds, profile = measure(engine, samples, args.repeats)
        ms_per_image = 1e3 * seconds / args.images
        row = {"variant": variant, "ms_per_image": ms_per_image, "seconds": seconds,
               "tflops_per_s": flops * args.images / seconds / 1e12,
               "share_of_bf16_limit": flops * args.images / seconds / 1e12 / H200_BF16_TFLOPS, **profile}
        rows.append(row)
        print(f"{variant:<8} {ms_per_image:6.2f} ms/image  {row['tflops_per_s']:5.0f} TFLOP/s "
              f"({row['share_of_bf16_limit']:.0%} of {H200_BF16_TFLOPS:.0f})  host gap {profile['host_gap_ms']:.0f} ms "
              f"of {profile['profiled_wall_ms']:.0f}", flush=True)
        for label, ms in profile["by_class_ms"].items():
            print(f"    {label:<30} {ms:8.1f} ms  {ms / profile['device_busy_ms']:5.1%}")
        for kernel in profile["top_kernels_ms"][:8]:
            print(f"      {kernel['ms']:8.2f} ms  {kernel['name'][:100]}")
        del engine
        torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join(["python -m benchmarks.profile_vision", *sys.argv[1:]]), "model": args.model,
            "workload": args.workload, "images": args.images, "patches_per_image": patches,
            "tower_tflop_per_image": flops / 1e12, "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__, "rows": rows},
            indent=2))


if __name__ == "__main__":
    main()
