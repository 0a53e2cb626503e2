"""How each method scores a pack's visual tokens at a pruning layer (higher = keep).

- sparsevlm: mean over heads and raters of the raters' attention (SPARSEVLM.md section 2).
- sparsevlm_v2: each head's attention divided by the RoPE-only prior (no floor), averaged
  over the heads with the most corrected rater->visual mass, per sample: the official v2.0
  code keeps 14 of 32 heads, so V2_HEAD_SHARE of the model's (section 6). For M-RoPE models
  the prior is the rotation the model really applies: each frequency turns with its own
  position component (temporal, height or width), so for 1-D RoPE it is the official prior.
- fastv: attention the last prompt token pays each visual token, mean over heads.
- random: a uniform draw from a generator seeded by the config seed and the sample's own
  tokens, so a sample's subset never depends on its batch mates.

Attention comes from `kernels.rater_scores` (Triton on CUDA, or under TRITON_INTERPRET=1)
or its plain-torch reference on CPU.
"""

from __future__ import annotations

import os
import zlib

import torch

from kernels.rater_scores import RoPEPrior, rater_scores, rater_scores_reference

from ..adapters.base import PreparedSample
from ..config import SparsityConfig
from .pack import PrunedPack
from .ragged import offsets, segment_ids, to_device
from .raters import rater_weights


V2_HEAD_SHARE = 14 / 32  # SparseVLM+ averages the top 14 of LLaVA-1.5's 32 heads


def use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class VisualScorer:
    def __init__(self, config: SparsityConfig, samples: list[PreparedSample], pack: PrunedPack,
                 embeds: torch.Tensor, rope_tables: tuple[torch.Tensor, torch.Tensor] | None):
        self.config = config
        self.method = config.method
        self.rope_tables = rope_tables
        self.weights = None
        if self.method in ("sparsevlm", "sparsevlm_v2"):
            self.weights = rater_weights(embeds, pack.visual_rows(), pack.visual, pack.text_rows(), pack.texts)
        self.generators = None
        if self.method == "random":
            self.generators = []
            for sample in samples:
                generator = torch.Generator()
                digest = zlib.crc32(sample.input_ids.numpy().tobytes())
                generator.manual_seed((config.seed << 32) ^ digest)
                self.generators.append(generator)

    def scores(self, pack: PrunedPack, vis_rows: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None,
               positions: torch.Tensor, scale: float) -> torch.Tensor:
        """(n_visual,) float32 scores of the rows `vis_rows` (in pack order)."""
        if self.method == "random":
            draws = [torch.rand(n, generator=g) for n, g in zip(pack.visual, self.generators)]
            return to_device(torch.cat(draws), vis_rows.device)
        if self.method == "fastv":
            text_rows, weights = pack.last_rows(), torch.ones(len(pack.texts), device=q.device)
            text_offsets = list(range(len(pack.texts) + 1))
            seq_starts = pack.cu_seqlens[:-1]
        else:
            text_rows, weights, text_offsets = pack.text_rows(), self.weights, pack.text_offsets
            seq_starts = pack.text_seq_starts()
        vis_offsets = offsets(pack.visual)

        def attention(prior: RoPEPrior | None) -> torch.Tensor:  # (n_visual, heads)
            if use_triton(q.device):
                return rater_scores(q, k, text_rows, seq_starts, weights, text_offsets, vis_rows.int(), vis_offsets,
                                    scale, prior=prior)
            bounds = list(zip(pack.offsets[:-1], pack.offsets[1:]))
            split = lambda t, offs: list(torch.split(t, [b - a for a, b in zip(offs, offs[1:])]))  # noqa: E731
            return rater_scores_reference(q, k, bounds, split(text_rows.long(), text_offsets),
                                          split(weights, text_offsets), split(vis_rows, vis_offsets), scale,
                                          prior=prior)

        if self.method != "sparsevlm_v2":
            return attention(None).mean(1)
        return top_heads_mean(attention(RoPEPrior(positions, *self.rope_tables)), pack.visual)


def heads_kept(num_heads: int) -> int:
    return max(1, round(V2_HEAD_SHARE * num_heads))


def top_heads_mean(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per sample (`sizes` rows each), rank heads by their total score over the sample's visual
    tokens (scores: n_visual, heads) and average the scores over the `heads_kept` best."""
    num_heads = scores.shape[1]
    chosen = heads_kept(num_heads)
    sample = segment_ids(sizes, scores.device)
    mass = scores.new_zeros(len(sizes), num_heads).index_add_(0, sample, scores)
    top = torch.sort(mass, dim=1, descending=True, stable=True).indices[:, :chosen]
    selected = torch.zeros_like(mass).scatter_(1, top, 1.0)
    return (scores * selected[sample]).sum(1) / chosen


def rater_attention_ranks(pack: PrunedPack, weights: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          scale: float) -> list[int]:
    """Per sample, rank of R = head-averaged attention of its raters on its visual tokens
    (raters x visual), from the Gram matrix R R^T (raters x raters). One host sync per call:
    the rank-adaptive variant needs the counts on the host to lay out the pack."""
    rater_mask = (weights > 0).cpu()
    group = q.shape[1] // k.shape[1]
    vis_rows = pack.visual_rows().cpu()
    ranks, text_at, vis_at = [], 0, 0
    for start, head, n_text, n_visual in zip(pack.offsets, pack.heads, pack.texts, pack.visual):
        raters = start + head + torch.nonzero(rater_mask[text_at:text_at + n_text])[:, 0]
        visual = vis_rows[vis_at:vis_at + n_visual]
        text_at, vis_at = text_at + n_text, vis_at + n_visual
        if n_visual == 0 or raters.numel() == 0:
            ranks.append(0)
            continue
        keys = k[start:int(raters.max()) + 1].float().repeat_interleave(group, dim=1)  # L, Hq, D
        logits = torch.einsum("rhd,lhd->hrl", q[raters.to(q.device)].float(), keys) * scale
        causal = torch.arange(keys.shape[0], device=q.device)[None, :] <= (raters.to(q.device) - start)[:, None]
        probs = logits.masked_fill(~causal[None], float("-inf")).softmax(-1).mean(0)  # raters, L
        block = probs[:, (visual - start).to(q.device)]
        eig = torch.linalg.eigvalsh(block @ block.T)
        tolerance = eig.max().clamp_min(0) * max(block.shape) * torch.finfo(torch.float32).eps
        ranks.append(int((eig > tolerance).sum()))
    return ranks
