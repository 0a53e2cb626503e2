"""FP8 (e4m3) GEMMs for the vision tower's linear layers, behind `EngineConfig.vision_fp8`.

The tower runs on every patch before any pruning, and at bf16 its GEMMs already run near the
H200's matrix rate (benchmarks/results/h200_vision_profile.json), so FP8's doubled rate is what
is left to take. The scheme is the usual dynamic one (vLLM's "fp8 dynamic"): each weight row
(output channel) gets its own scale once, at load; each activation row (token) gets its own
scale at every call, from its absolute maximum. Per-row scales need no pass over the whole
tensor, so inside a compiled block the activation's quantisation fuses into the norm or
activation kernel that produces it. `torch._scaled_mm` multiplies in FP8 and applies both
scales in fp32 before rounding to the output dtype.

`_scaled_mm` wants both weight dimensions in multiples of 16; Qwen2.5-VL's MLP is 3420 wide.
Weights are zero-padded once (extra output channels are sliced off, extra input columns
meet zero-padded activations), so every linear of every tower qualifies and the result is
that of the unpadded product. In a SwiGLU MLP, `down(act(gate(x)) * up(x))`, gate and up
instead hand their padded width on (its columns are exactly zero, and act(0) * 0 = 0): the
quantisation of down's input then runs over one width, which the compiler makes one kernel,
where a slice and a pad split it into two passes over the MLP's widest activation.

Numerics: e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per value); with per-row
scales the products' errors average over K. `tests/test_fp8_vision.py` states the bounds; the
scene probes' accuracy with and without it is in the README.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
ALIGN = 16  # _scaled_mm: both dimensions of the weight in multiples of 16
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) on


def _round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def quantize_rows(x: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (M, width) e4m3 values (zero-padded past K) and (M, 1) fp32 scales, so that
    row i is approximately values[i, :K] * scales[i]. An all-zero row gets scale 1 (no NaN)."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    values = (x / scale).clamp(-E4M3_MAX, E4M3_MAX)
    if width is not None and width > x.shape[-1]:
        values = torch.nn.functional.pad(values, (0, width - x.shape[-1]))
    return values.to(E4M3), scale


class Fp8Linear(torch.nn.Module):
    """A copy of `linear` that multiplies in e4m3 with per-row scales (the original is untouched:
    `model.generate` and the bf16 path keep it). It takes its input at its width or zero-padded
    to a multiple of 16; with `pad_output` it returns its output zero-padded likewise."""

    def __init__(self, linear: torch.nn.Linear, pad_output: bool = False):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.in_features, self.out_features, self.pad_output = in_features, out_features, pad_output
        padded_in, padded_out = _round_up(in_features), _round_up(out_features)
        weight = torch.nn.functional.pad(linear.weight.detach().float(), (0, 0, 0, padded_out - out_features))
        values, scales = quantize_rows(weight, padded_in)  # one scale per output channel
        # _scaled_mm takes the weight column-major: the (N, K) row-major values, transposed
        self.register_buffer("weight_t", values.t(), persistent=False)
        self.register_buffer("weight_scale", scales.t().contiguous(), persistent=False)  # (1, N)
        bias = linear.bias
        if bias is not None and pad_output:
            bias = torch.nn.functional.pad(bias, (0, padded_out - out_features))
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading, width = x.shape[:-1], x.shape[-1]
        if width not in (self.in_features, self.weight_t.shape[0]):
            raise ValueError(f"Fp8Linear takes {self.in_features} features (or {self.weight_t.shape[0]} zero-padded), "
                             f"not {width}")
        values, scales = quantize_rows(x.reshape(-1, width), self.weight_t.shape[0])
        # CUDA's per-row-scaled kernels write bf16 only (an fp16 or fp32 tower gets it cast back)
        out_dtype = torch.bfloat16 if values.is_cuda else x.dtype
        out = torch._scaled_mm(values, self.weight_t, scale_a=scales, scale_b=self.weight_scale, out_dtype=out_dtype)
        if not self.pad_output:
            out = out[:, :self.out_features]
        out = out.to(x.dtype)
        if self.bias is not None:  # added here rather than in the GEMM: compiled, it fuses into the next kernel
            out = out + self.bias.to(out.dtype)
        return out.reshape(*leading, out.shape[-1])

    def extra_repr(self) -> str:
        padded = ", output zero-padded" if self.pad_output else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-row scales{padded}"


SWIGLU = ("gate_proj", "up_proj", "down_proj")  # down(act(gate(x)) * up(x)): Qwen2.5-VL's tower MLP


def padded_swiglu_inputs(parent: torch.nn.Module) -> set[str]:
    """The names of `parent`'s linears whose FP8 copies hand their zero padding on: gate and up of
    a SwiGLU MLP whose width is not a multiple of 16 (down takes their product padded)."""
    gate, up, down = (getattr(parent, name, None) for name in SWIGLU)
    if not all(isinstance(m, torch.nn.Linear) for m in (gate, up, down)):
        return set()
    width = gate.out_features
    if up.out_features != width or down.in_features != width or width % ALIGN == 0:
        return set()
    return set(SWIGLU[:2])


def fp8_replacements(roots: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, str, Fp8Linear]]:
    """(parent, attribute, FP8 copy) for every `nn.Linear` under `roots`, each once. Not inside
    `nn.MultiheadAttention`, which reads its projection's weight directly instead of calling it."""
    found, seen = [], set()
    for root in roots:
        for parent in root.modules():
            if isinstance(parent, torch.nn.MultiheadAttention):
                continue
            padded = padded_swiglu_inputs(parent)
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear) and id(child) not in seen:
                    seen.add(id(child))
                    found.append((parent, name, Fp8Linear(child, pad_output=name in padded)))
    return found


def check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs need FP8 tensor cores on CUDA (the CPU runs torch's reference kernels)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(f"EngineConfig.vision_fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, "
                         f"Hopper or newer); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                         "Leave vision_fp8 off on this GPU")
