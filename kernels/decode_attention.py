"""Decode attention over a ragged KV cache: one new query token per sample, GQA.

The cache of one layer is a flat pool `k_cache, v_cache: (num_slots, num_kv_heads, head_dim)`;
sample b owns the slots `[starts[b], starts[b] + lengths[b])`. Nothing is padded, so a
sample's cache costs exactly the tokens it kept.

`decode_attention` is the Triton kernel (one program per sample and KV head; the query
heads of a GQA group share each K/V load); `decode_attention_reference` is the plain-torch
definition it is tested against, and the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               starts: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (B, Hq, D); caches: (N, Hkv, D); starts, lengths: (B,) -> (B, Hq, D)."""
    out = torch.zeros_like(q)
    for b, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if length == 0:
            continue
        k = k_cache[start:start + length].transpose(0, 1)  # Hkv, L, D
        v = v_cache[start:start + length].transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b, :, None], k, v, scale=scale, enable_gqa=True)[:, 0]
    return out


@triton.jit
def _decode_attention_kernel(Q, K, V, Out, Starts, Lengths, scale,
                             stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                             stride_ob, stride_oh,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    start = tl.load(Starts + b).to(tl.int64)
    length = tl.load(Lengths + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    q_heads = kv_head * GROUP + g
    g_valid = g < GROUP
    q = tl.load(Q + b * stride_qb + q_heads[:, None] * stride_qh + d[None, :], mask=g_valid[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, length, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_valid = n < length
        rows = start + n
        k = tl.load(K + rows[:, None] * stride_kn + kv_head * stride_kh + d[None, :], mask=n_valid[:, None], other=0.0)
        v = tl.load(V + rows[:, None] * stride_vn + kv_head * stride_vh + d[None, :], mask=n_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # GROUP_PAD, BLOCK_N
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # an empty sample (length 0) gives zeros
    tl.store(Out + b * stride_ob + q_heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
             mask=g_valid[:, None])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     starts: torch.Tensor, lengths: torch.Tensor, scale: float,
                     block_n: int = 64) -> torch.Tensor:
    """Triton launcher; same contract as `decode_attention_reference`."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q (B, Hq, D) and caches (N, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_q_heads % num_kv_heads or k_cache.shape[2] != head_dim:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads}) "
                         f"and head dims must agree ({head_dim} vs {k_cache.shape[2]})")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and caches must be contiguous in the head dimension")
    if starts.shape != (batch,) or lengths.shape != (batch,):
        raise ValueError(f"starts and lengths must have shape ({batch},)")
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    _decode_attention_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, out, starts, lengths, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32 (no TF32)
    )
    return out
