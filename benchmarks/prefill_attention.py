"""The decoder's prefill attention alone, by backend: what a pack of n samples of L tokens costs.

    python -m benchmarks.prefill_attention                                    # CPU: tiny shapes, SDPA only
    python -m benchmarks.prefill_attention --samples 29 --length 1121 --json out.json   # GPU: caption-1024's pack

The engine's prefill calls flash-attn's varlen function, or torch's `varlen_attn` (FlashAttention-2
inside PyTorch) when flash-attn is not installed, as `AttentionBackend.varlen` makes the call. On an H100 that was ~89 ms of a dense `caption-1024` run's 1.58 s of prefill
(~180 TFLOP/s; README). This times the alternatives on the same tensors (causal, GQA: Qwen2.5-VL-7B's
28 query and 4 KV heads of 128): the engine's varlen call, and SDPA over the pack as a batch (its samples of
equal length, as a fixed prompt on same-size images makes them) with each backend torch has, and
reports each one's largest difference from the plain per-sample SDPA reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.vision_kernels import cuda_ms
from sparsevlm.attention import AttentionBackend, prefill_attention_reference

SDPA_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}


def causal_flops(samples: int, length: int, heads: int, head_dim: int) -> float:
    """QK^T and PV over the causal half: 2 GEMMs x 2 FLOPs x L^2/2 x D per head."""
    return 2.0 * samples * heads * length * length * head_dim


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Median ms of `repeats` calls after a warm-up: CUDA events on the GPU, wall time on the CPU."""
    if device.type == "cuda":
        return cuda_ms(fn, repeats)
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def candidates(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, samples: int, length: int, scale: float) -> dict:
    """name -> a call returning (T, Hq, D); those this torch or device lacks are left out."""
    runs = {}
    cu = torch.arange(0, (samples + 1) * length, length, dtype=torch.int32, device=q.device)
    for name in ("flash_attn", "torch_varlen") if q.is_cuda else ():
        try:  # the engine's own call, as it makes it
            backend = AttentionBackend(name, q.device)
        except ImportError:
            continue
        runs[name] = lambda backend=backend: backend.varlen(q, k, v, cu, None, length, scale, causal=True)
    batched = [t.view(samples, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(*batched, is_causal=True, scale=scale, enable_gqa=True)
            return out.transpose(1, 2).reshape(q.shape)
        return run
    for name, backend in SDPA_BACKENDS.items():
        runs[name] = sdpa(backend)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="samples in the pack (default: 29 on CUDA, 2 on CPU)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sample (default: 1121 on CUDA, 64 on CPU)")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    samples = args.samples or (29 if device.type == "cuda" else 2)
    length = args.length or (1121 if device.type == "cuda" else 64)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = lambda heads: (samples * length, heads, args.head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), generator=generator, device=device, dtype=dtype)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    scale = args.head_dim ** -0.5
    cu = [i * length for i in range(samples + 1)]
    reference = prefill_attention_reference(q.float(), k.float(), v.float(), cu, scale, causal=True)
    flops = causal_flops(samples, length, args.heads, args.head_dim)
    rows = []
    for name, run in candidates(q, k, v, samples, length, scale).items():
        try:
            error = (run().float() - reference).abs().max().item()
            ms = timed_ms(run, device, args.repeats)
        except RuntimeError as failure:  # a backend this device or these shapes do not support
            rows.append({"backend": name, "error": str(failure).splitlines()[0][:160]})
            continue
        rows.append({"backend": name, "ms": ms, "tflops_per_s": flops / ms / 1e9, "max_abs_diff": error})
    print(f"{samples} samples x {length} tokens, {args.heads}/{args.kv_heads} heads of {args.head_dim}, causal, "
          f"{dtype}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"{'backend':<16}{'ms':>9}{'TFLOP/s':>10}{'max |diff|':>12}")
    for row in rows:
        if "error" in row:
            print(f"{row['backend']:<16}  unsupported: {row['error']}")
        else:
            print(f"{row['backend']:<16}{row['ms']:>9.3f}{row['tflops_per_s']:>10.1f}{row['max_abs_diff']:>12.2e}")
    if args.json:
        report = {"command": " ".join(["python", "-m", "benchmarks.prefill_attention", *sys.argv[1:]]),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "samples": samples, "length": length, "heads": args.heads,
                  "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": str(dtype), "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
