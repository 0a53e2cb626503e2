"""The FP8 quantisation kernels compiled for Hopper, no GPU needed: their SASS instruction count.

    python -m benchmarks.kernel_sass                      # CPU: Triton's own compiler, ptxas, nvdisasm

Compiles `kernels/fp8_quant.py`'s kernels for sm_90 at the shapes the engine hands them (Qwen2.5-VL's
tower: SwiGLU rows padded to 3424 with fp32 biases; RMSNorm rows of 1280 in bf16) and counts the
instructions in each kernel's SASS: every thread runs them once (one program per row or rows), so
the count per thread, against the values each thread holds, says how much issuing a kernel costs
beside its memory traffic. Counts are static (a rarely taken branch, e.g. the slow path of a correctly
rounded division, counts too). Run it outside TRITON_INTERPRET=1, which makes kernels uncompilable.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.fp8_quant import E4M3_MAX, _quantize_rows_kernel, _swiglu_quantize_kernel, launch_shape

HOPPER = GPUTarget("cuda", 90, 32)


def _swiglu_source(width: int):
    shape = launch_shape("swiglu_quantize", width)
    signature = {"GateUp": "*bf16", "Bias": "*fp32", "Values": "*fp8e4nv", "Scales": "*fp32", "n_rows": "i32",
                 "width": "i32", "stride_g": "i32", "stride_v": "i32",
                 **dict.fromkeys(["HAS_BIAS", "E4M3_MAX", "EMULATE", "ROWS", "BLOCK"], "constexpr")}
    constants = {"HAS_BIAS": True, "E4M3_MAX": E4M3_MAX, "EMULATE": False, "ROWS": shape["ROWS"],
                 "BLOCK": shape["BLOCK"]}
    divisible = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6, 7)}  # pointers; width, strides
    return ASTSource(fn=_swiglu_quantize_kernel, signature=signature, constexprs=constants, attrs=divisible), shape


def _rms_rows_source(width: int):
    shape = launch_shape("quantize_rows", width)
    signature = {"X": "*bf16", "NormWeight": "*bf16", "NormBias": "*bf16", "Values": "*fp8e4nv", "Scales": "*fp32",
                 "n_rows": "i32", "width": "i32", "padded_width": "i32", "stride_x": "i32", "stride_v": "i32",
                 "eps": "fp32", **dict.fromkeys(["NORM", "NORM_BIAS", "ROUND_NORMED", "ROUND_PRODUCT", "E4M3_MAX",
                                                 "EMULATE", "ROWS", "BLOCK"], "constexpr")}
    constants = {"NORM": 1, "NORM_BIAS": False, "ROUND_NORMED": True, "ROUND_PRODUCT": True, "E4M3_MAX": E4M3_MAX,
                 "EMULATE": False, "ROWS": shape["ROWS"], "BLOCK": shape["BLOCK"]}
    divisible = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 6, 7, 8, 9)}
    return ASTSource(fn=_quantize_rows_kernel, signature=signature, constexprs=constants, attrs=divisible), shape


# name -> (the kernel's source at the engine's shape, values per row it holds)
KERNELS = {"swiglu_quantize 3424": (lambda: _swiglu_source(3424), 3424),
           "rms_norm_quantize 1280": (lambda: _rms_rows_source(1280), 1280)}


def compiled(name: str):
    """(Triton's compiled kernel for Hopper, its launch shape) for a `KERNELS` name."""
    source, shape = KERNELS[name][0]()
    return triton.compile(source, target=HOPPER, options={"num_warps": shape["num_warps"]}), shape


def sass_instructions(cubin: bytes) -> list[str]:
    """The opcodes of a cubin's SASS, in order (nvdisasm as Triton's NVIDIA backend ships it)."""
    import triton.backends.nvidia as nvidia

    nvdisasm = Path(nvidia.__file__).parent / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([str(nvdisasm), "-c", file.name], capture_output=True, text=True, check=True).stdout
    lines = re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", listing, flags=re.M)
    return [op for op in lines if op != "NOP"]


def count(name: str) -> dict:
    kernel, shape = compiled(name)
    ops = sass_instructions(kernel.asm["cubin"])
    threads = 32 * shape["num_warps"]
    return {"kernel": name, "launch": shape, "instructions_per_thread": len(ops),
            "values_per_thread": shape["ROWS"] * KERNELS[name][1] / threads,
            "top_opcodes": collections.Counter(ops).most_common(12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = [count(name) for name in KERNELS]
    for r in rows:
        print(f"{r['kernel']:<24} {r['instructions_per_thread']:>5} instructions per thread for "
              f"{r['values_per_thread']:.1f} values; {', '.join(f'{op} {n}' for op, n in r['top_opcodes'][:6])}")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "triton": triton.__version__,
                                          "target": "sm_90", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
