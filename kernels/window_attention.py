"""Bidirectional attention within short segments of a packed stream: a vision tower's windows.

Qwen2.5-VL's tower runs 28 of its 32 blocks as attention within windows of at most 64
patches (8x8). Through a generic varlen kernel (FlashAttention) each window is a separate
sequence padded into a 128-row tile; the work per window is tiny, so the kernel is bound by
its own overheads. Here one program owns one (window, head): it loads the window's q, k, v
once, forms the whole <= 64 x 64 score tile, and writes the output: one pass over memory.

Given the tower's rotary tables (`cos`, `sin`), the kernel also rotates q and k as it loads
them (transformers' `apply_rotary_pos_emb_vision`: fp32, rounded back to q's dtype), so the
rotated q and k never go to memory: compiled, that rotation was a pass writing both and the
kernel's a pass reading them back.

`window_attention` is the Triton kernel (any head_dim up to 128, padded in registers);
`window_attention_reference` is the plain-torch definition it is tested against, and the
CPU path; `rotary_reference` is the rotation. `torch.ops.sparsevlm.window_attention` is the
kernel as an opaque op, so compiled vision blocks keep it as one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_WINDOW = 64  # tokens per segment the kernel holds in one tile


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) rotated by cos, sin (T, D) as Qwen's vision towers do: in fp32, halves swapped
    (`rotate_half`), the result rounded to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, None].float() + rotated * sin[:, None].float()).to(x.dtype)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float, cos: torch.Tensor | None = None,
                               sin: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (T, H, D); cu_seqlens: (S+1,) -> (T, H, D), attention within each segment;
    with cos, sin (T, D), of q and k rotated first (`rotary_reference`)."""
    if cos is not None:
        q, k = rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # H, L, D
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1)
    return out


@triton.jit
def _rotated_scores(Q, K, Cos, Sin, rows, stride_qt, stride_kt, stride_ct, stride_st, valid_rows,
                    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, PRECISION: tl.constexpr):
    """q k^T over one window with q and k rotated first (rotate_half: (x1, x2) -> (x1 cos - x2 sin,
    x2 cos + x1 sin) per half, in fp32, rounded back to q's dtype), the two halves loaded
    separately so every load is contiguous: (BLOCK_T, BLOCK_T) fp32."""
    half: tl.constexpr = HEAD_DIM // 2
    h = tl.arange(0, BLOCK_HALF)
    valid = valid_rows[:, None] & (h < half)[None, :]
    first, second = rows[:, None] * stride_ct + h[None, :], rows[:, None] * stride_ct + half + h[None, :]
    cos1 = tl.load(Cos + first, mask=valid, other=0.0).to(tl.float32)
    cos2 = tl.load(Cos + second, mask=valid, other=0.0).to(tl.float32)
    first, second = rows[:, None] * stride_st + h[None, :], rows[:, None] * stride_st + half + h[None, :]
    sin1 = tl.load(Sin + first, mask=valid, other=0.0).to(tl.float32)
    sin2 = tl.load(Sin + second, mask=valid, other=0.0).to(tl.float32)
    q1 = tl.load(Q + rows[:, None] * stride_qt + h[None, :], mask=valid, other=0.0)
    q2 = tl.load(Q + rows[:, None] * stride_qt + half + h[None, :], mask=valid, other=0.0)
    dtype = q1.dtype
    q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    q1, q2 = (q1 * cos1 - q2 * sin1).to(dtype), (q2 * cos2 + q1 * sin2).to(dtype)
    k1 = tl.load(K + rows[:, None] * stride_kt + h[None, :], mask=valid, other=0.0).to(tl.float32)
    k2 = tl.load(K + rows[:, None] * stride_kt + half + h[None, :], mask=valid, other=0.0).to(tl.float32)
    k1, k2 = (k1 * cos1 - k2 * sin1).to(dtype), (k2 * cos2 + k1 * sin2).to(dtype)
    return (tl.dot(q1, tl.trans(k1), input_precision=PRECISION).to(tl.float32)
            + tl.dot(q2, tl.trans(k2), input_precision=PRECISION).to(tl.float32))


@triton.jit
def _window_attention_kernel(Q, K, V, Out, CuSeqlens, Cos, Sin, scale,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_ot, stride_oh, stride_ct, stride_st,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             BLOCK_T: tl.constexpr, PRECISION: tl.constexpr, ROTARY: tl.constexpr):
    segment = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(CuSeqlens + segment).to(tl.int64)
    length = tl.load(CuSeqlens + segment + 1).to(tl.int64) - start
    if length > 0:  # an empty segment has nothing to write
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        valid = (t < length)[:, None] & (d < HEAD_DIM)[None, :]
        rows = start + t
        if ROTARY:
            s = _rotated_scores(Q + head * stride_qh, K + head * stride_kh, Cos, Sin, rows, stride_qt, stride_kt,
                                stride_ct, stride_st, t < length, HEAD_DIM, BLOCK_HALF, PRECISION)
        else:
            q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=valid, other=0.0)
            k = tl.load(K + rows[:, None] * stride_kt + head * stride_kh + d[None, :], mask=valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)
        v = tl.load(V + rows[:, None] * stride_vt + head * stride_vh + d[None, :], mask=valid, other=0.0)
        s = s * scale  # BLOCK_T x BLOCK_T
        s = tl.where((t < length)[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=valid)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     num_warps: int | None = None) -> torch.Tensor:
    """Triton launcher; same contract as `window_attention_reference`, segments of <= MAX_WINDOW
    tokens (the caller checks: a longer one would be cut). `num_warps`: Triton's default unless
    given (benchmarks/vision_kernels.py sweeps it)."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"expected q, k, v of one shape (T, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] > 128 or q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"head_dim must be <= 128 and dtypes equal; got {q.shape[-1]}, {q.dtype}/{k.dtype}/{v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous in the head dimension")
    rotary = cos is not None
    if rotary != (sin is not None):
        raise ValueError("give both rotary tables, cos and sin, or neither")
    if rotary:
        expected = (q.shape[0], q.shape[2])
        if tuple(cos.shape) != expected or tuple(sin.shape) != expected or q.shape[2] % 2:
            raise ValueError(f"rotary tables must be (T, D) = {expected} with D even; got {tuple(cos.shape)}, "
                             f"{tuple(sin.shape)}")
        if cos.stride(-1) != 1 or sin.stride(-1) != 1:
            raise ValueError("the rotary tables must be contiguous in their last dimension")
    out = torch.empty_like(q)
    segments, heads, head_dim = cu_seqlens.numel() - 1, q.shape[1], q.shape[2]
    if segments < 1 or q.shape[0] == 0:
        return out
    cos, sin = (cos, sin) if rotary else (q, q)  # unread without ROTARY
    _window_attention_kernel[(segments, heads)](
        q, k, v, out, cu_seqlens, cos, sin, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), sin.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_HALF=max(16, triton.next_power_of_2(head_dim // 2)), BLOCK_T=MAX_WINDOW,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
        ROTARY=rotary, **({"num_warps": num_warps} if num_warps else {}),
    )
    return out


@torch.library.custom_op("sparsevlm::window_attention", mutates_args=())
def window_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        scale: float, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    return window_attention(q, k, v, cu_seqlens, scale, cos, sin)


@window_attention_op.register_fake
def _(q, k, v, cu_seqlens, scale, cos=None, sin=None):
    return torch.empty_like(q)
