"""The one-pass FP8 quantisation kernels (kernels/fp8_quant.py) against their plain-torch references.

CPU runs the Triton interpreter (conftest), CUDA the compiled kernels. Tolerance: at least 99%
of the e4m3 values are identical to the reference's, and every one is within one e4m3 step
(relative 2^-3, or 2^-9 of the row's scale below e4m3's normal range): a different summation
order (the norm's variance) or a different exp/rsqrt may tip a value across a rounding boundary,
never further. Scales agree to 2^-7 relative (one bf16 rounding inside the norm, at most).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.fp8_quant import (
    E4M3, quantize_rows, quantize_rows_reference, swiglu_quantize, swiglu_quantize_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows_case(rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with the awkward ones in: all zero, tiny (e4m3 subnormals after scaling), one outlier."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator) * 3
    if rows >= 3:
        x[0] = 0
        x[1, : width // 2] *= 1e-4  # half the row far below its maximum
        x[2, 0] = 1e3
    return x.to(DEVICE, dtype)


def assert_quantized_close(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    (values, scales), (want_values, want_scales) = got, want
    assert values.dtype == E4M3 and values.shape == want_values.shape and scales.shape == want_scales.shape
    torch.testing.assert_close(scales, want_scales, rtol=2 ** -7, atol=0)
    got_v, want_v = values.float(), want_values.float()
    assert (got_v == want_v).float().mean().item() >= 0.99
    step = torch.maximum(want_v.abs() * 2 ** -3, torch.full_like(want_v, 2 ** -9 * 448))  # in units of the scale
    assert ((got_v - want_v).abs() <= step).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,padded_width", [(1, 1, 16), (7, 37, 48), (33, 1280, 1280), (5, 3420, 3424)])
def test_quantize_rows_equals_the_reference(rows, width, padded_width, dtype):
    x = rows_case(rows, width, dtype, seed=width)
    got = quantize_rows(x, padded_width)
    assert_quantized_close(got, quantize_rows_reference(x, padded_width))
    assert not got[0][:, width:].float().any()  # the padding is zero
    if rows >= 3:
        assert got[1][0].item() == 1.0 and not got[0][0].float().any()  # a zero row: scale 1, no NaN


@pytest.mark.parametrize("norm,bias", [("rms", False), ("layer", True), ("layer", False)])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rows,width", [(3, 24), (9, 1280), (4, 1000)])
def test_quantize_rows_with_its_norm_equals_the_reference(rows, width, dtype, weight_dtype, norm, bias):
    x = rows_case(rows, width, dtype, seed=width + 1) + 0.5  # an offset for the LayerNorm's mean to take
    generator = torch.Generator().manual_seed(width)
    weight = (torch.rand(width, generator=generator) + 0.5).to(DEVICE, weight_dtype)
    norm_bias = torch.randn(width, generator=generator).to(DEVICE, weight_dtype) if bias else None
    padded = -(-width // 16) * 16
    got = quantize_rows(x, padded, norm, weight, norm_bias, eps=1e-6)
    want = quantize_rows_reference(x, padded, norm, weight, norm_bias, eps=1e-6)
    if norm == "layer" and not bias:
        # Row 0 is constant: its LayerNorm is zero. A mean one rounding off (the GPU's fp32 division is
        # not exact; CUDA's LayerNorm sums its own way) leaves noise ~1e-5, which the row's own scale
        # blows up to full e4m3 values: each side is held to zero after dequantising, not to the other.
        for values, scales in (got, want):
            assert (values[0].float() * scales[0]).abs().max().item() < 1e-3
        got, want = tuple(t[1:] for t in got), tuple(t[1:] for t in want)
    assert_quantized_close(got, want)


@pytest.mark.parametrize("rows_per_program,num_warps", [(1, 4), (2, 8), (16, 4)])
def test_every_launch_shape_gives_the_same_result(rows_per_program, num_warps):
    """The benchmark's sweep: any rows per program (a last program part empty) and warps."""
    x = rows_case(21, 300, torch.bfloat16, seed=9)
    weight = torch.linspace(0.5, 1.5, 300, device=DEVICE, dtype=torch.bfloat16)
    launch = {"rows_per_program": rows_per_program, "num_warps": num_warps}
    want = quantize_rows(x, 304, "layer", weight, weight - 1, 1e-6)
    got = quantize_rows(x, 304, "layer", weight, weight - 1, 1e-6, **launch)
    assert torch.equal(got[0].float(), want[0].float()) and torch.equal(got[1], want[1])
    gate_up = rows_case(21, 2 * 304, torch.bfloat16, seed=10)
    assert_quantized_close(swiglu_quantize(gate_up, **launch), swiglu_quantize_reference(gate_up))


def test_quantize_rows_reads_strided_rows():
    x = rows_case(6, 64, torch.float32, seed=3)[:, :40]  # a column slice: row stride 64
    assert_quantized_close(quantize_rows(x, 48), quantize_rows_reference(x, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,bias", [(1, 16, False), (6, 24, True), (17, 3424, True), (3, 1712, False),
                                             (5, 3420, True)])  # Qwen2.5-VL's tower: no multiple of 16
def test_swiglu_quantize_equals_the_reference(rows, width, bias, dtype):
    gate_up = rows_case(rows, 2 * width, dtype, seed=width + rows)
    generator = torch.Generator().manual_seed(rows)
    bias_values = torch.randn(2 * width, generator=generator).to(DEVICE) if bias else None
    got = swiglu_quantize(gate_up, bias_values)
    assert got[0].shape == (rows, width)
    assert_quantized_close(got, swiglu_quantize_reference(gate_up, bias_values))


def test_swiglu_quantize_reads_strided_rows():
    gate_up = rows_case(5, 112, torch.bfloat16, seed=4)[:, :96]  # gate and up of 48 in rows 112 apart
    assert_quantized_close(swiglu_quantize(gate_up), swiglu_quantize_reference(gate_up))


# Compiles the SwiGLU kernel for Hopper (benchmarks/kernel_sass.py) and prints its global loads and
# stores and its SASS opcodes, for rows as the engine hands them over: Fp8SwiGLU pads Qwen2.5-VL's
# 3420 to 3424, and Triton specialises integer arguments divisible by 16 (width 3424, row strides 6848
# and 3424) as such. In a fresh interpreter: the tests' TRITON_INTERPRET=1 makes every @triton.jit an
# interpreted function, which cannot compile.
SWIGLU_COMPILED = """
import json, re
from benchmarks.kernel_sass import compiled, sass_instructions
kernel, _ = compiled("swiglu_quantize 3424")
ptx = kernel.asm["ptx"]
print(json.dumps({"loads": re.findall(r"ld\\.global\\S*", ptx), "stores": re.findall(r"st\\.global\\S*", ptx),
                  "opcodes": sass_instructions(kernel.asm["cubin"])}))
"""


@pytest.fixture(scope="module")
def swiglu_for_hopper() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SWIGLU_COMPILED], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_swiglu_kernel_moves_16_byte_vectors_at_the_engines_width(swiglu_for_hopper):
    """Compiled for Hopper (no GPU needed: Triton's own compiler), the engine's padded rows are
    loaded and stored 16 bytes at a time. (Unpadded, 3420 wide, every load would be one bf16.)"""
    accesses = swiglu_for_hopper
    assert accesses["loads"] and all(".v4." in a for a in accesses["loads"]), set(accesses["loads"])
    assert any(".v4." in a for a in accesses["stores"]), set(accesses["stores"])


def test_swiglu_kernel_guards_no_value_and_lays_out_nothing_twice(swiglu_for_hopper):
    """Its SASS: the SiLU and the scaling compare no value against a range (`tl.sigmoid` and a division
    per value put ~2 FSETP per value, 35 in all), and the only barrier is the row maximum's (a 1-D bias
    load was re-laid out through shared memory: 17 barriers)."""
    opcodes = swiglu_for_hopper["opcodes"]
    assert opcodes.count("FSETP") <= 8, opcodes.count("FSETP")
    assert opcodes.count("BAR") <= 2, opcodes.count("BAR")


def test_the_launchers_refuse_what_they_cannot_take():
    x = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="narrower"):
        quantize_rows(x, 4)
    with pytest.raises(ValueError, match="norm_weight of shape"):
        quantize_rows(x, 16, "rms", torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="one of"):
        quantize_rows(x, 16, "batch", torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="norm_bias goes with a layer norm"):
        quantize_rows(x, 16, "rms", torch.ones(8, device=DEVICE), torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="even width"):
        swiglu_quantize(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="power of 2"):
        quantize_rows(x, 16, rows_per_program=3)
    with pytest.raises(ValueError, match="rows, width"):
        swiglu_quantize(torch.zeros(8, device=DEVICE))


def test_empty_inputs_give_empty_outputs():
    values, scales = quantize_rows(torch.zeros(0, 20, device=DEVICE), 32)
    assert values.shape == (0, 32) and scales.shape == (0, 1)


def test_the_ops_fake_shapes_agree_with_their_kernels():
    """What a compiled graph is told (the fake implementations) matches what the ops return."""
    x, weight = torch.randn(5, 40), torch.rand(40) + 0.5
    torch.library.opcheck(torch.ops.sparsevlm.quantize_rows.default, (x, 48, "rms", weight, None, 1e-6))
    torch.library.opcheck(torch.ops.sparsevlm.quantize_rows.default, (x, 48, "layer", weight, weight, 1e-6))
    torch.library.opcheck(torch.ops.sparsevlm.quantize_rows.default, (x, 40, "none", None, None, 0.0))
    torch.library.opcheck(torch.ops.sparsevlm.swiglu_quantize.default, (torch.randn(3, 32), torch.randn(32)))
