"""Text raters: which text tokens judge the visual tokens (SPARSEVLM.md section 1).

Per sample, from the LLM input embeddings, in fp32:
    P = softmax over the sample's text tokens of E_v E_t^T (unscaled), r_j = mean_i P[i, j],
    rater_j = r_j > 1/T (all text tokens if none passes).
Returns per-text-token weights 1/n_raters for raters and 0 otherwise, so "mean over raters"
is a weighted sum. Samples are padded into small chunks (memory bounded), never mixed.
"""

from __future__ import annotations

import torch

from .ragged import pad_index, to_device, unpad

CHUNK_BYTES = 256 << 20  # fp32 visual embeddings padded per chunk of samples


def rater_weights(embeds: torch.Tensor, vis_rows: torch.Tensor, vis_sizes: list[int],
                  text_rows: torch.Tensor, text_sizes: list[int]) -> torch.Tensor:
    """embeds (T, D); visual / text rows of each sample concatenated, sizes per sample on the
    host. -> (sum(text_sizes),) float32 rater weights."""
    weights = torch.zeros(text_rows.shape[0], dtype=torch.float32, device=embeds.device)
    per_sample = max(max(vis_sizes, default=1), 1) * embeds.shape[1] * 4
    chunk = max(1, CHUNK_BYTES // per_sample)
    vis_at = text_at = 0
    for first in range(0, len(vis_sizes), chunk):
        v_sizes, t_sizes = vis_sizes[first:first + chunk], text_sizes[first:first + chunk]
        v_rows = vis_rows[vis_at:vis_at + sum(v_sizes)]
        t_rows = text_rows[text_at:text_at + sum(t_sizes)]
        weights[text_at:text_at + sum(t_sizes)] = _chunk_weights(embeds, v_rows, v_sizes, t_rows, t_sizes)
        vis_at += sum(v_sizes)
        text_at += sum(t_sizes)
    return weights


def _chunk_weights(embeds, vis_rows, vis_sizes, text_rows, text_sizes) -> torch.Tensor:
    device = embeds.device
    v_index, v_valid = pad_index(vis_sizes, device)
    t_index, t_valid = pad_index(text_sizes, device)
    e_v = embeds[vis_rows[v_index]].float()  # S, V, D
    e_t = embeds[text_rows[t_index]].float()  # S, T, D
    logits = torch.bmm(e_v, e_t.transpose(1, 2)).masked_fill(~t_valid[:, None, :], float("-inf"))
    probs = logits.softmax(-1).masked_fill(~v_valid[:, :, None], 0.0)
    n_vis = to_device(torch.tensor(vis_sizes, dtype=torch.float32), device).clamp_min(1)
    n_text = to_device(torch.tensor(text_sizes, dtype=torch.float32), device).clamp_min(1)
    share = probs.sum(1) / n_vis[:, None]  # S, T: r_j
    raters = (share > 1.0 / n_text[:, None]) & t_valid
    raters = torch.where(raters.any(1, keepdim=True), raters, t_valid)  # nobody passes: everyone rates
    weights = raters.float() / raters.sum(1, keepdim=True).clamp_min(1)
    return unpad(weights, t_index, t_valid, text_rows.shape[0])
