"""Rater-row attention on visual keys, over packed ragged samples, with GQA.

For every sample of a packed stream (rows `seq_start .. seq_end` of q and k), a few text
rows are "raters" with weights w_r (summing to 1 per sample). For each visual row v and
query head h this computes

    scores[v, h] = sum_r w_r * softmax_j(q[r, h] . k[j, h // group] * scale, j <= r)[v]

i.e. the rater rows of the full causal attention matrix, normalised over ALL keys of the
sample's causal context (not renormalised over visual keys), restricted to visual
columns. Only rater rows are touched: O(raters x length x heads x dim), never L^2.

Optionally (`prior`) each probability is divided by the RoPE-only prior of its relative
position, W(delta) = 2/sqrt(D) * sum_i cos(delta_sec(i) * theta_i) (SparseVLM+; M-RoPE gives each
frequency i its own position component). As in the official v2.0 code there is no floor: where
W <= 0 the corrected score is negative (or, at W = 0 exactly, infinite), and so it ranks last
(or first); a floor would make the ranking follow the prior's zero crossings instead of content.

`rater_scores` is the Triton implementation (two launches: per-rater log-sum-exp, then
per visual block accumulation over the sample's raters, deterministic, no atomics);
`rater_scores_reference` is the plain-torch definition it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

@dataclass
class RoPEPrior:
    positions: torch.Tensor  # (P, T) long: position ids of the packed rows (P = 3 for M-RoPE)
    inv_freq: torch.Tensor  # (D/2,) float32: the rotary frequencies
    sections: torch.Tensor  # (D/2,) long: which position component frequency i rotates with

    def weight(self, rows_a: torch.Tensor, rows_b: torch.Tensor, head_dim: int) -> torch.Tensor:
        """W(pos[a] - pos[b]) for all pairs: (len(a), len(b)) float32."""
        pos = self.positions[self.sections]  # (D/2, T): the component each frequency sees
        delta = (pos[:, rows_a][:, :, None] - pos[:, rows_b][:, None, :]).float()  # D/2, A, B
        return (2 / head_dim ** 0.5) * torch.cos(delta * self.inv_freq.float()[:, None, None]).sum(0)


def rater_scores_reference(q: torch.Tensor, k: torch.Tensor, seq_bounds: list[tuple[int, int]],
                           text_rows: list[torch.Tensor], text_weights: list[torch.Tensor],
                           vis_rows: list[torch.Tensor], scale: float,
                           prior: RoPEPrior | None = None) -> torch.Tensor:
    """Per sample, slice the full softmax(QK^T) matrix. q (T, Hq, D), k (T, Hkv, D); per sample
    its row range and absolute rater rows / weights / visual rows. -> (sum of visual rows, Hq)."""
    group = q.shape[1] // k.shape[1]
    out = []
    for (start, end), raters, weights, visual in zip(seq_bounds, text_rows, text_weights, vis_rows):
        qs = q[start:end].float().transpose(0, 1)  # Hq, L, D
        ks = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        logits = qs @ ks.transpose(1, 2) * scale
        length = end - start
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # Hq, L, L
        block = probs[:, raters - start][:, :, visual - start]  # Hq, R, V
        if prior is not None:
            block = block / prior.weight(raters, visual, q.shape[-1])
        out.append((block * weights.float()[None, :, None]).sum(1).transpose(0, 1))  # V, Hq
    return torch.cat(out) if out else q.new_zeros(0, q.shape[1], dtype=torch.float32)


@triton.jit
def _rater_lse_kernel(Q, K, Lse, Rows, SeqStarts,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_lr,
                      scale, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(Rows + r).to(tl.int64)
    start = tl.load(SeqStarts + r).to(tl.int64)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    for n0 in range(start, row + 1, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n <= row
        k = tl.load(K + n[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(Lse + r * stride_lr + heads, m_i + tl.log(l_i), mask=g < GROUP)


@triton.jit
def _rater_scores_kernel(Q, K, Lse, Out, TextRows, TextWeights, VisRows,
                         BlockSample, BlockVisStart, BlockVisEnd, TextOffsets,
                         Positions, InvFreq, Sections,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_lr, stride_ov, stride_pp,
                         scale, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_V: tl.constexpr, PRIOR: tl.constexpr, HALF: tl.constexpr,
                         PRECISION: tl.constexpr):
    blk = tl.program_id(0)
    kv_head = tl.program_id(1)
    sample = tl.load(BlockSample + blk)
    v_start = tl.load(BlockVisStart + blk)
    v_end = tl.load(BlockVisEnd + blk)
    t_begin = tl.load(TextOffsets + sample)
    t_end = tl.load(TextOffsets + sample + 1)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    g_valid = g < GROUP
    vi = v_start + tl.arange(0, BLOCK_V)
    v_valid = vi < v_end
    v_rows = tl.load(VisRows + vi, mask=v_valid, other=0).to(tl.int64)
    k = tl.load(K + v_rows[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=v_valid[:, None], other=0.0)
    if PRIOR:
        f = tl.arange(0, HALF)
        inv_freq = tl.load(InvFreq + f)
        section = tl.load(Sections + f).to(tl.int64)
        v_pos = tl.load(Positions + section[None, :] * stride_pp + v_rows[:, None], mask=v_valid[:, None], other=0)
    acc = tl.zeros([GROUP_PAD, BLOCK_V], dtype=tl.float32)
    for t in range(t_begin, t_end):
        w = tl.load(TextWeights + t)
        if w != 0:
            row = tl.load(TextRows + t).to(tl.int64)
            q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_valid[:, None],
                        other=0.0)
            lse = tl.load(Lse + t * stride_lr + heads, mask=g_valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where((v_rows <= row)[None, :] & v_valid[None, :] & g_valid[:, None], p, 0.0)
            if PRIOR:
                r_pos = tl.load(Positions + section * stride_pp + row)
                delta = (r_pos[None, :] - v_pos).to(tl.float32)  # BLOCK_V, HALF
                prior = (2.0 / tl.sqrt(HEAD_DIM * 1.0)) * tl.sum(tl.cos(delta * inv_freq[None, :]), axis=1)
                p = p / prior[None, :]
            acc += w * p
    tl.store(Out + vi[None, :] * stride_ov + heads[:, None], acc, mask=g_valid[:, None] & v_valid[None, :])


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned, so the host does not wait for the GPU work already queued."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def rater_scores(q: torch.Tensor, k: torch.Tensor, text_rows: torch.Tensor, text_seq_starts: torch.Tensor,
                 text_weights: torch.Tensor, text_offsets: list[int], vis_rows: torch.Tensor,
                 vis_offsets: list[int], scale: float, prior: RoPEPrior | None = None,
                 block_v: int = 64, block_n: int = 64) -> torch.Tensor:
    """Triton launcher. q (T, Hq, D), k (T, Hkv, D), last dim contiguous. Per sample s, its
    text (rater candidate) rows are text_rows[text_offsets[s]:text_offsets[s+1]] with weights
    (0 = not a rater) and the first row of their sample in `text_seq_starts`; its visual rows
    are vis_rows[vis_offsets[s]:vis_offsets[s+1]]. Offsets are host lists (known when the
    pack is laid out). -> (len(vis_rows), Hq) float32, same contract as the reference."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_q_heads % num_kv_heads or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not form a GQA pair")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous in the head dimension")
    if len(text_offsets) != len(vis_offsets):
        raise ValueError("text_offsets and vis_offsets must both have one entry per sample plus one")
    device = q.device
    group = num_q_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    out = torch.zeros(vis_rows.shape[0], num_q_heads, dtype=torch.float32, device=device)
    n_text = text_rows.shape[0]
    if n_text == 0 or vis_rows.shape[0] == 0:
        return out
    lse = torch.empty(n_text, num_q_heads, dtype=torch.float32, device=device)
    _rater_lse_kernel[(n_text, num_kv_heads)](
        q, k, lse, text_rows, text_seq_starts, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
        scale, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_N=block_n, PRECISION=precision)
    blocks = [(s, start, min(start + block_v, end)) for s, (begin, end) in enumerate(zip(vis_offsets, vis_offsets[1:]))
              for start in range(begin, end, block_v)]
    table = _to_device(torch.tensor(blocks, dtype=torch.int32).T.contiguous(), device)
    offsets = _to_device(torch.tensor(text_offsets, dtype=torch.int32), device)
    if prior is not None:
        positions = prior.positions.contiguous()
        extra = (positions, prior.inv_freq.float().contiguous(), prior.sections.contiguous())
        stride_pp = positions.stride(0)
    else:
        extra, stride_pp = (out, out, out), 0
    _rater_scores_kernel[(len(blocks), num_kv_heads)](
        q, k, lse, out, text_rows, text_weights, vis_rows, table[0], table[1], table[2], offsets, *extra,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), out.stride(0), stride_pp,
        scale, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_V=block_v, PRIOR=prior is not None,
        HALF=head_dim // 2, PRECISION=precision)
    return out
