"""The vision tower's kernels one by one, at the 7B tower's shapes (Qwen2.5-VL: width 1280, 16 heads
of 80, MLP 3420, windows of 64 patches): each option's time per call and its rate.

    python -m benchmarks.vision_kernels --images 32 --json OUT.json      # GPU

Attention (per block over the pack): FlashAttention varlen (what the engine ran), our window
kernel, and SDPA over a (windows | images, heads, L, 80) batch with each backend. GEMMs (per
block): bf16 `mm` against FP8 e4m3 `torch._scaled_mm` with row-wise scales, with and without the
cost of quantising the activation. FP8 activation quantisation (per block, kernels/fp8_quant.py):
our one-pass kernels over a sweep of rows per program and warps (the first row of each shape is
the default launch), against the compiled plain-torch reference. Medians of CUDA-event timings
after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

WIDTH, HEADS, HEAD_DIM, MLP, WINDOW, PATCHES = 1280, 16, 80, 3420, 64, 4096


def cuda_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_rows(images: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.window_attention import window_attention
    from sparsevlm.attention import AttentionBackend

    tokens = images * PATCHES
    q, k, v = (torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    backend = AttentionBackend.choose(torch.device("cuda"))
    scale = HEAD_DIM ** -0.5
    rows = []
    for span, label in ((WINDOW, "window 64"), (PATCHES, "full 4096")):
        cu = torch.arange(0, tokens + 1, span, device="cuda", dtype=torch.int32)
        flops = 4 * tokens * span * HEAD_DIM * HEADS
        options = {f"varlen ({backend.name})": lambda: backend.varlen(q, k, v, cu, None, span, scale, causal=False)}
        if span <= WINDOW:
            options["window kernel"] = lambda: window_attention(q, k, v, cu, scale)
        batched = [t.view(tokens // span, span, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)]
        for name, choice in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                             ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(choice=choice):
                with sdpa_kernel([choice]):
                    return F.scaled_dot_product_attention(*batched, scale=scale)
            options[f"sdpa {name} (batched)"] = run
        for name, fn in options.items():
            try:
                ms = cuda_ms(fn)
            except RuntimeError as error:  # a backend that refuses the shape
                rows.append({"kind": "attention", "span": label, "option": name, "error": str(error)[:160]})
                continue
            rows.append({"kind": "attention", "span": label, "option": name, "ms": ms,
                         "tflops_per_s": flops / ms / 1e9, "ms_per_image": ms / images})
    return rows


def gemm_rows(images: int) -> list[dict]:
    tokens = images * PATCHES
    rows = []
    e4m3 = torch.float8_e4m3fn
    for name, k_dim, n_dim in (("qkv", WIDTH, 3 * WIDTH), ("proj", WIDTH, WIDTH), ("gate+up", WIDTH, 2 * MLP),
                               ("down", MLP, WIDTH)):
        x = torch.randn(tokens, k_dim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_dim, k_dim, device="cuda", dtype=torch.bfloat16) / k_dim ** 0.5
        flops = 2 * tokens * k_dim * n_dim
        # FP8 GEMMs take dimensions in multiples of 16 (the MLP's 3420 is not): zero-pad, as a kernel would
        pad = lambda t, dim: F.pad(t, (0, -t.shape[1] % 16) if dim == 1 else (0, 0, 0, -t.shape[0] % 16))  # noqa: E731
        x_padded, w_padded = pad(x, 1), pad(pad(w, 1), 0)
        w_scale = (w_padded.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / 448)
        w8, w_scale = (w_padded / w_scale).to(e4m3), w_scale.T.contiguous()  # (N, K) row-major, (1, N)

        def quantise():
            x_scale = x_padded.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / 448
            return (x_padded / x_scale).to(e4m3), x_scale

        x8, x_scale = quantise()

        def fp8_with_quantise():
            activations, scale = quantise()
            return torch._scaled_mm(activations, w8.T, scale_a=scale, scale_b=w_scale, out_dtype=torch.bfloat16)

        options = {"bf16 mm": lambda: x @ w.T,
                   "fp8 scaled_mm": lambda: torch._scaled_mm(x8, w8.T, scale_a=x_scale, scale_b=w_scale,
                                                             out_dtype=torch.bfloat16),
                   "fp8 scaled_mm + quantise": fp8_with_quantise}
        for option, fn in options.items():
            try:
                ms = cuda_ms(fn)
            except RuntimeError as error:
                rows.append({"kind": "gemm", "shape": name, "option": option, "error": str(error)[:160]})
                continue
            rows.append({"kind": "gemm", "shape": f"{name} {tokens}x{k_dim}x{n_dim}", "option": option, "ms": ms,
                         "tflops_per_s": flops / ms / 1e9, "ms_per_image": ms / images})
    return rows


def quantise_rows(images: int) -> list[dict]:
    from kernels.fp8_quant import launch_shape, quantize_rows, quantize_rows_reference, swiglu_quantize, \
        swiglu_quantize_reference

    tokens = images * PATCHES
    mlp = -(-MLP // 16) * 16
    x = torch.randn(tokens, WIDTH, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(WIDTH, device="cuda", dtype=torch.bfloat16) + 0.5
    gate_up = torch.randn(tokens, 2 * mlp, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(2 * mlp, device="cuda")
    cases = {  # shape: (our kernel with launch overrides, the reference, width, bytes moved, its name)
        f"rmsnorm+quantise {tokens}x{WIDTH}": (lambda **o: quantize_rows(x, WIDTH, "rms", weight, None, 1e-6, **o),
                                            lambda: quantize_rows_reference(x, WIDTH, "rms", weight, None, 1e-6), WIDTH,
                                            tokens * WIDTH * 3, "quantize_rows"),
        f"quantise {tokens}x{WIDTH}": (lambda **o: quantize_rows(x, WIDTH, **o), lambda: quantize_rows_reference(x),
                                       WIDTH, tokens * WIDTH * 3, "quantize_rows"),
        f"swiglu+quantise {tokens}x{mlp}": (lambda **o: swiglu_quantize(gate_up, bias, **o),
                                            lambda: swiglu_quantize_reference(gate_up, bias), mlp, tokens * mlp * 5,
                                            "swiglu_quantize"),
    }
    rows = []
    for shape, (ours, reference, width, moved, kernel) in cases.items():
        default = launch_shape(kernel, width)
        options = {f"ours default ({default['ROWS']} rows, {default['num_warps']} warps)": ours}
        options.update({f"ours {r} rows, {w} warps": (lambda r=r, w=w: ours(rows_per_program=r, num_warps=w))
                        for r in (1, 2, 4, 8) for w in (4, 8)})
        options["compiled torch reference"] = torch.compile(reference)
        for option, fn in options.items():
            try:
                ms = cuda_ms(fn)
            except Exception as error:  # noqa: BLE001  a launch too big for the registers: reported, not fatal
                rows.append({"kind": "quantise", "shape": shape, "option": option, "error": str(error)[:160]})
                continue
            rows.append({"kind": "quantise", "shape": shape, "option": option, "ms": ms, "gb_per_s": moved / ms / 1e6,
                         "ms_per_image": ms / images})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--parts", default="attention,gemm,quantise", help="comma-separated: which kernels to time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    parts = {"attention": attention_rows, "gemm": gemm_rows, "quantise": quantise_rows}
    unknown = set(args.parts.split(",")) - set(parts)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {sorted(parts)}")
    rows = [row for name in args.parts.split(",") for row in parts[name](args.images)]
    for row in rows:
        where = row.get("span") or row.get("shape")
        if "error" in row:
            print(f"{row['kind']:<9} {where:<26} {row['option']:<28} error: {row['error']}")
        else:
            rate = f"{row['tflops_per_s']:6.0f} TFLOP/s" if "tflops_per_s" in row else f"{row['gb_per_s']:6.0f} GB/s"
            print(f"{row['kind']:<9} {where:<26} {row['option']:<28} {row['ms']:8.3f} ms  {rate}  "
                  f"{row['ms_per_image']:.4f} ms/image")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python -m benchmarks.vision_kernels", *sys.argv[1:]]),
                                         "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                         "images": args.images, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
