"""Bidirectional attention within short segments of a packed stream: a vision tower's windows.

Qwen2.5-VL's tower runs 28 of its 32 blocks as attention within windows of at most 64
patches (8x8). Through a generic varlen kernel (FlashAttention) each window is a separate
sequence padded into a 128-row tile; the work per window is tiny, so the kernel is bound by
its own overheads. Here one program owns one (window, head): it loads the window's q, k, v
once, forms the whole <= 64 x 64 score tile, and writes the output: one pass over memory.

`window_attention` is the Triton kernel (any head_dim up to 128, padded in registers);
`window_attention_reference` is the plain-torch definition it is tested against, and the
CPU path. `torch.ops.sparsevlm.window_attention` is the kernel as an opaque op, so compiled
vision blocks keep it as one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_WINDOW = 64  # tokens per segment the kernel holds in one tile


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """q, k, v: (T, H, D); cu_seqlens: (S+1,) -> (T, H, D), attention within each segment."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # H, L, D
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1)
    return out


@triton.jit
def _window_attention_kernel(Q, K, V, Out, CuSeqlens, scale,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_ot, stride_oh,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                             PRECISION: tl.constexpr):
    segment = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(CuSeqlens + segment).to(tl.int64)
    length = tl.load(CuSeqlens + segment + 1).to(tl.int64) - start
    if length > 0:  # an empty segment has nothing to write
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        valid = (t < length)[:, None] & (d < HEAD_DIM)[None, :]
        rows = start + t
        q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=valid, other=0.0)
        k = tl.load(K + rows[:, None] * stride_kt + head * stride_kh + d[None, :], mask=valid, other=0.0)
        v = tl.load(V + rows[:, None] * stride_vt + head * stride_vh + d[None, :], mask=valid, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # BLOCK_T x BLOCK_T
        s = tl.where((t < length)[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=valid)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Triton launcher; same contract as `window_attention_reference`, segments of <= MAX_WINDOW
    tokens (the caller checks: a longer one would be cut)."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"expected q, k, v of one shape (T, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] > 128 or q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"head_dim must be <= 128 and dtypes equal; got {q.shape[-1]}, {q.dtype}/{k.dtype}/{v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous in the head dimension")
    out = torch.empty_like(q)
    segments, heads, head_dim = cu_seqlens.numel() - 1, q.shape[1], q.shape[2]
    if segments < 1 or q.shape[0] == 0:
        return out
    _window_attention_kernel[(segments, heads)](
        q, k, v, out, cu_seqlens, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_T=MAX_WINDOW,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
    )
    return out


@torch.library.custom_op("sparsevlm::window_attention", mutates_args=())
def window_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        scale: float) -> torch.Tensor:
    return window_attention(q, k, v, cu_seqlens, scale)


@window_attention_op.register_fake
def _(q, k, v, cu_seqlens, scale):
    return torch.empty_like(q)
