"""FP8 (e4m3) GEMMs for the vision tower's linear layers, behind `EngineConfig.vision_fp8`.

The tower runs on every patch before any pruning, and at bf16 its GEMMs already run near the
H200's matrix rate (benchmarks/results/h200_vision_profile.json), so FP8's doubled rate is what
is left to take. The scheme is the usual dynamic one (vLLM's "fp8 dynamic"): each weight row
(output channel) gets its own scale once, at load; each activation row (token) gets its own
scale at every call, from its absolute maximum. `torch._scaled_mm` multiplies in FP8 and
applies both scales in fp32 before rounding to the output dtype.

Quantising an activation is a pass over it; kernels/fp8_quant.py makes it one pass, with its
producer fused in where the block's structure allows (the adapter names those places):
- an RMSNorm or LayerNorm whose only reader is the next linear is computed inside that linear's
  quantisation (`Fp8Linear(input_norm=...)`; the norm becomes the identity in the engine's calls);
- a SwiGLU MLP, `down(silu(gate(x)) * up(x))`, runs gate and up as one GEMM, and the bias, the
  activation, the product and down's quantisation as one kernel (`Fp8SwiGLU`).

`_scaled_mm` wants both weight dimensions in multiples of 16; Qwen2.5-VL's MLP is 3420 wide.
Weights are zero-padded once (extra output channels are sliced off, extra input columns
meet zero-padded activations), so every linear of every tower qualifies and the result is
that of the unpadded product. A gated MLP the fused kernel does not cover (not SiLU) has gate
and up hand their padded width on (its columns are exactly zero, and act(0) * 0 = 0), so
down's input quantises over one width.

Numerics: e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per value); with per-row
scales the products' errors average over K. `tests/test_fp8_vision.py` states the bounds; the
scene probes' accuracy with and without it is in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# importing kernels.fp8_quant registers the torch.ops.sparsevlm quantisation ops the copies call
from kernels.fp8_quant import E4M3, quantize_rows_reference  # noqa: F401  (E4M3: this module's name for the type)

ALIGN = 16  # _scaled_mm: both dimensions of the weight in multiples of 16
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) on


def _round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class FusedNorm:
    """A norm the quantisation kernel computes itself: kind ("rms" or "layer"), weight, bias, eps."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, norm: torch.nn.Module) -> "FusedNorm | None":
        """A Llama/Qwen-style RMSNorm (`weight * normed.to(dtype)`) or an affine `nn.LayerNorm` over
        the last dimension; None for any other norm (left to the compiler)."""
        if isinstance(norm, torch.nn.LayerNorm):
            if norm.weight is None or len(norm.normalized_shape) != 1:
                return None
            return cls("layer", norm.weight.detach(), None if norm.bias is None else norm.bias.detach(), norm.eps)
        weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
        if not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "bias", None) is not None \
                or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
            return None
        return cls("rms", weight.detach(), None, eps)


def _fused_norm_note(kind: str) -> str:
    return {"rms": ", RMSNorm fused", "layer": ", LayerNorm fused"}.get(kind, "")


class Fp8Linear(torch.nn.Module):
    """`x @ weight.T + bias` in e4m3 with per-row scales, from a copy of the weight (the model's
    linear is untouched: `model.generate` and the bf16 path keep it). Takes its input at its
    width or zero-padded to a multiple of 16; with `pad_output` returns its output zero-padded
    likewise; with `input_norm` (an RMSNorm or LayerNorm) quantises the norm of its input."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pad_output: bool = False,
                 input_norm: torch.nn.Module | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.pad_output = in_features, out_features, pad_output
        self.padded_in, padded_out = _round_up(in_features), _round_up(out_features)
        weight = torch.nn.functional.pad(weight.detach().float(), (0, 0, 0, padded_out - out_features))
        values, scales = quantize_rows_reference(weight, self.padded_in)  # one scale per output channel
        # _scaled_mm takes the weight column-major: the (N, K) row-major values, transposed
        self.register_buffer("weight_t", values.t(), persistent=False)
        self.register_buffer("weight_scale", scales.t().contiguous(), persistent=False)  # (1, N)
        if bias is not None and pad_output:
            bias = torch.nn.functional.pad(bias, (0, padded_out - out_features))
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        norm = None if input_norm is None else FusedNorm.of(input_norm)
        if input_norm is not None and (norm is None or norm.weight.shape != (in_features,)):
            raise ValueError(f"Fp8Linear fuses an RMSNorm or affine LayerNorm over its {in_features} inputs, "
                             f"not {input_norm}")
        self.norm_kind = "none" if norm is None else norm.kind
        self.norm_eps = 0.0 if norm is None else norm.eps
        self.register_buffer("norm_weight", None if norm is None else norm.weight, persistent=False)
        self.register_buffer("norm_bias", None if norm is None else norm.bias, persistent=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **options) -> "Fp8Linear":
        return cls(linear.weight, linear.bias, **options)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K or padded K) activations -> (M, padded K) e4m3 and (M, 1) scales (of the norm, if fused)."""
        width = x.shape[-1]
        fused = self.norm_kind != "none"
        if width != self.in_features and (width != self.padded_in or fused):
            padded = "" if fused else f" (or {self.padded_in} zero-padded)"
            raise ValueError(f"Fp8Linear takes {self.in_features} features{padded}, not {width}")
        return torch.ops.sparsevlm.quantize_rows(x, self.padded_in, self.norm_kind, self.norm_weight, self.norm_bias,
                                                 self.norm_eps)

    def multiply(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Quantised (M, padded K) activations -> (M, N) (padded N with `pad_output`) in `dtype`."""
        if values.is_cuda:  # per-row-scaled kernels write bf16 only (an fp16 or fp32 tower gets it cast back)
            out = torch._scaled_mm(values, self.weight_t, scale_a=scales, scale_b=self.weight_scale,
                                   out_dtype=torch.bfloat16)
        else:  # the same product in fp32, where e4m3 products are exact (CPU _scaled_mm: row scales from torch 2.13)
            out = (values.float() @ self.weight_t.float()) * scales * self.weight_scale
        if not self.pad_output:
            out = out[:, :self.out_features]
        out = out.to(dtype)
        if self.bias is not None:  # added here rather than in the GEMM: compiled, it fuses into the next kernel
            out = out + self.bias.to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading, width = x.shape[:-1], x.shape[-1]
        out = self.multiply(*self.quantize(x.reshape(-1, width)), x.dtype)
        return out.reshape(*leading, out.shape[-1])

    def extra_repr(self) -> str:
        extras = (", output zero-padded" if self.pad_output else "") + _fused_norm_note(self.norm_kind)
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-row scales{extras}"


SWIGLU = ("gate_proj", "up_proj", "down_proj")  # down(act(gate(x)) * up(x)): Qwen2.5-VL's tower MLP


def _swiglu_linears(mlp: torch.nn.Module) -> tuple[torch.nn.Linear, ...] | None:
    """gate, up and down of a gated MLP of consistent widths, else None."""
    gate, up, down = (getattr(mlp, name, None) for name in SWIGLU)
    if not all(isinstance(m, torch.nn.Linear) for m in (gate, up, down)):
        return None
    width = gate.out_features
    if up.out_features != width or down.in_features != width or up.in_features != gate.in_features:
        return None
    return gate, up, down


def is_silu_swiglu(mlp: torch.nn.Module) -> bool:
    """A gated MLP whose activation is SiLU: `Fp8SwiGLU` computes it whole."""
    act = getattr(mlp, "act_fn", None)
    return _swiglu_linears(mlp) is not None and (isinstance(act, torch.nn.SiLU) or
                                                 type(act).__name__ == "SiLUActivation")


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """fp32 copy of a weight (N, K) or bias (N,) with zero rows appended up to `rows`."""
    t = t.detach().float()
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class Fp8SwiGLU(torch.nn.Module):
    """`down(silu(gate(x)) * up(x))` in e4m3: gate and up as one GEMM (their weights side by side,
    each zero-padded to a multiple of 16), then one kernel for the biases, the activation, the
    product and down's quantisation (kernels/fp8_quant.py), then down. With `input_norm`, the
    norm before the MLP is fused into the first quantisation."""

    def __init__(self, mlp: torch.nn.Module, input_norm: torch.nn.Module | None = None):
        super().__init__()
        if not is_silu_swiglu(mlp):
            raise ValueError(f"Fp8SwiGLU takes a gate/up/down MLP with a SiLU activation, not {type(mlp).__name__}")
        gate, up, down = _swiglu_linears(mlp)
        width = gate.out_features
        padded = _round_up(width)
        self.gate_up = Fp8Linear(torch.cat([_padded_rows(gate.weight, padded), _padded_rows(up.weight, padded)]),
                                 input_norm=input_norm)
        bias = None
        if gate.bias is not None or up.bias is not None:
            zeros = gate.weight.new_zeros(width)
            bias = torch.cat([_padded_rows(zeros if m.bias is None else m.bias, padded) for m in (gate, up)])
        self.register_buffer("gate_up_bias", bias, persistent=False)
        self.down = Fp8Linear.from_linear(down)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading, width = x.shape[:-1], x.shape[-1]
        gate_up = self.gate_up(x.reshape(-1, width))  # (M, 2 * padded), bf16 on CUDA
        values, scales = torch.ops.sparsevlm.swiglu_quantize(gate_up, self.gate_up_bias)
        out = self.down.multiply(values, scales, x.dtype)
        return out.reshape(*leading, out.shape[-1])

    def extra_repr(self) -> str:
        fused = _fused_norm_note(self.gate_up.norm_kind)
        return f"width={self.width}, gate and up as one e4m3 GEMM, SiLU, product and quantisation one kernel{fused}"


def padded_swiglu_inputs(parent: torch.nn.Module) -> set[str]:
    """The names of `parent`'s linears whose FP8 copies hand their zero padding on: gate and up of
    a gated MLP `Fp8SwiGLU` does not cover, whose width is not a multiple of 16."""
    linears = _swiglu_linears(parent)
    if linears is None or linears[0].out_features % ALIGN == 0:
        return set()
    return set(SWIGLU[:2])


@dataclass(frozen=True)
class NormFeed:
    """`norm_parent.<norm>`'s output is read by `consumer_parent.<consumer>` (a linear or an MLP)
    and by nothing else, so the consumer's FP8 copy may compute the norm itself."""

    norm_parent: torch.nn.Module
    norm: str
    consumer_parent: torch.nn.Module
    consumer: str


Replacement = tuple[torch.nn.Module, str, torch.nn.Module]  # (parent, attribute, module in its place)


def _fused_norms(feeds: list[NormFeed]) -> list[Replacement]:
    found = []
    for feed in feeds:
        norm, consumer = getattr(feed.norm_parent, feed.norm), getattr(feed.consumer_parent, feed.consumer)
        if FusedNorm.of(norm) is None:
            continue  # a norm the kernel does not know: left to the compiler
        if is_silu_swiglu(consumer):
            copy = Fp8SwiGLU(consumer, input_norm=norm)
        elif isinstance(consumer, torch.nn.Linear):
            copy = Fp8Linear.from_linear(consumer, input_norm=norm)
        else:
            continue
        found += [(feed.norm_parent, feed.norm, torch.nn.Identity()), (feed.consumer_parent, feed.consumer, copy)]
    return found


def fp8_replacements(roots: list[torch.nn.Module], norm_feeds: list[NormFeed] = ()) -> list[Replacement]:
    """What to run in place of what, so that every `nn.Linear` under `roots` multiplies in FP8,
    each once: the fused norms of `norm_feeds` first, then SiLU SwiGLU MLPs whole, then each
    remaining linear. Not inside `nn.MultiheadAttention`, which reads its projection's weight
    directly instead of calling it."""
    found = _fused_norms(list(norm_feeds))
    seen = {id(m) for parent, name, _ in found for m in getattr(parent, name).modules()}
    for root in roots:
        for parent in root.modules():
            if isinstance(parent, torch.nn.MultiheadAttention) or id(parent) in seen:
                continue
            padded = padded_swiglu_inputs(parent)
            for name, child in parent.named_children():
                if id(child) in seen:
                    continue
                if is_silu_swiglu(child):
                    seen.update(id(m) for m in child.modules())
                    found.append((parent, name, Fp8SwiGLU(child)))
                elif isinstance(child, torch.nn.Linear):
                    seen.add(id(child))
                    found.append((parent, name, Fp8Linear.from_linear(child, pad_output=name in padded)))
    return found


def replaced_linears(replacements: list[Replacement]) -> int:
    """How many of the model's linears the replacements run in FP8."""
    return sum(isinstance(m, torch.nn.Linear) for parent, name, _ in replacements
               for m in getattr(parent, name).modules())


def check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs need FP8 tensor cores on CUDA (the CPU runs torch's reference kernels)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(f"EngineConfig.vision_fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, "
                         f"Hopper or newer); {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                         "Leave vision_fp8 off on this GPU")
