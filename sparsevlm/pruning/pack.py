"""One pack's token stream as it shrinks layer by layer: layout, pruning, regathering.

Each sample's rows are [head | text region]: the head runs up to the last visual token
(prefix, visual spans, anything between them), the text region is everything after it
(question, template tail) and is never pruned. At a pruning layer a sample keeps its
top-k visual tokens in their original order, appends its merged (recycled) tokens at
the end of its head, and keeps its text region. Samples stay back to back with no
padding; their new lengths follow from the plans, so the host always knows the layout
and nothing waits on the device. Kept rows carry their original position ids (a merged
token takes its cluster centre's) and, through the gathered rotary tables, the same
rotary embedding they had.
"""

from __future__ import annotations

import torch

from ..adapters.base import PreparedSample
from .ragged import compact, offsets, pad_index, rank_within_segments, segment_ids, to_device, unpad
from .recycling import density_peak_merge
from .schedule import PruneStep, SamplePlan

NOT_VISUAL, MERGED = -1, -2  # visual_ids of non-visual rows and of merged tokens


class PrunedPack:
    def __init__(self, samples: list[PreparedSample], plans: list[SamplePlan], device: torch.device):
        self.device = device
        self.plans = plans
        self.lengths = [s.num_tokens for s in samples]
        self.heads = [s.head_length for s in samples]
        self.visual = [s.num_visual_tokens for s in samples]
        self.texts = [length - head for length, head in zip(self.lengths, self.heads)]
        ids = []
        for s in samples:
            tags = torch.full((s.num_tokens,), NOT_VISUAL, dtype=torch.long)
            if s.num_visual_tokens:
                tags[s.is_visual] = torch.arange(s.num_visual_tokens)
            ids.append(tags)
        self.visual_ids = self._to_device(torch.cat(ids))  # per row: index among the sample's visual tokens
        self._first_visual = self._to_device(torch.tensor(offsets(self.visual)[:-1], dtype=torch.long))
        self._steps = [{step.layer: step for step in plan.steps} for plan in plans]
        self.pruning_layers = sorted({layer for steps in self._steps for layer in steps})
        self._refresh()

    # -- layout ------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        self.offsets = offsets(self.lengths)
        self.num_rows = self.offsets[-1]
        self.row_sample = segment_ids(self.lengths, self.device)
        starts = self._to_device(torch.tensor(self.offsets[:-1], dtype=torch.long))
        self.row_within = torch.arange(self.num_rows, device=self.device) - starts[self.row_sample]
        self.cu_seqlens = self._to_device(torch.tensor(self.offsets, dtype=torch.int32))  # (n+1,) for the kernels
        self.max_length = max(self.lengths)

    @property
    def text_offsets(self) -> list[int]:
        return offsets(self.texts)

    def text_rows(self) -> torch.Tensor:
        """(sum of text sizes,) int32: packed rows of every sample's text region, in order."""
        rows = [torch.arange(o + h, o + h + t) for o, h, t in zip(self.offsets, self.heads, self.texts)]
        return self._to_device(torch.cat(rows).int())

    def text_seq_starts(self) -> torch.Tensor:
        starts = [torch.full((t,), o) for o, t in zip(self.offsets, self.texts)]
        return self._to_device(torch.cat(starts).int())

    def last_rows(self) -> torch.Tensor:
        return self._to_device(torch.tensor([o - 1 for o in self.offsets[1:]], dtype=torch.int32))

    def visual_rows(self) -> torch.Tensor:
        """(sum of visual counts,) long: packed rows of visual tokens (merged included), in order."""
        return compact(self.visual_ids != NOT_VISUAL, sum(self.visual))

    def replan(self, index: int, plan: SamplePlan) -> None:
        """Swap sample `index`'s plan for one decided on the device (rank-adaptive keeps)."""
        self.plans[index] = plan
        self._steps[index] = {step.layer: step for step in plan.steps}

    def steps_at(self, layer: int) -> list[PruneStep | None]:
        return [steps.get(layer) for steps in self._steps]

    def slot_mapping(self, layer_starts: torch.Tensor) -> torch.Tensor:
        """Cache slot of every row for one layer, given each sample's first slot there (S,)."""
        return layer_starts[self.row_sample] + self.row_within

    # -- pruning -----------------------------------------------------------------------------------
    def prune(self, layer: int, scores: torch.Tensor, vis_rows: torch.Tensor, hidden: torch.Tensor,
              positions: torch.Tensor, rotary: tuple[torch.Tensor, ...]):
        """Apply this layer's steps. scores (n_visual,) for the rows `vis_rows`; hidden (T, H)
        is the layer's output. -> (hidden, positions, rotary) of the new, shorter stream."""
        steps = self.steps_at(layer)
        keep = [step.keep if step else v for step, v in zip(steps, self.visual)]
        n_recycled = [step.n_recycled if step else 0 for step in steps]
        n_clusters = [step.n_clusters if step else 0 for step in steps]
        vis_sample = segment_ids(self.visual, self.device)
        rank = rank_within_segments(scores, self.visual)
        keep_v = self._to_device(torch.tensor(keep, dtype=torch.long))[vis_sample]
        recycle_v = self._to_device(torch.tensor(n_recycled, dtype=torch.long))[vis_sample]
        kept_visual = rank < keep_v
        row_kept = self.visual_ids == NOT_VISUAL
        row_kept[vis_rows] = kept_visual

        num_merged = sum(n_clusters)
        merged = hidden.new_zeros(0, hidden.shape[1])
        centre_rows = torch.zeros(0, dtype=torch.long, device=self.device)
        if num_merged:
            recycled = compact((rank >= keep_v) & (rank < keep_v + recycle_v), sum(n_recycled))
            index, valid = pad_index(n_recycled, self.device)
            candidate_rows = vis_rows[recycled][index]  # S, R: in row order within each sample
            merged_padded, centres, _ = density_peak_merge(hidden[candidate_rows], valid, n_clusters)
            c_index, c_valid = pad_index(n_clusters, self.device)
            merged = unpad(merged_padded, c_index, c_valid, num_merged).to(hidden.dtype)
            centre_rows = unpad(torch.gather(candidate_rows, 1, centres), c_index, c_valid, num_merged)

        kept_head = [h - v + k for h, v, k in zip(self.heads, self.visual, keep)]
        new_lengths = [kh + c + t for kh, c, t in zip(kept_head, n_clusters, self.texts)]
        new_offsets = offsets(new_lengths)
        per_sample = lambda values: self._to_device(torch.tensor(values, dtype=torch.long))  # noqa: E731
        new_start, head, kept_head_t = per_sample(new_offsets[:-1]), per_sample(self.heads), per_sample(kept_head)
        seg, within = self.row_sample, self.row_within
        in_head = within < head[seg]
        head_kept = row_kept & in_head
        rank_in_head = head_kept.long().cumsum(0) - per_sample(offsets(kept_head)[:-1])[seg] - 1
        clusters_t = per_sample(n_clusters)
        dest = torch.where(in_head, torch.where(head_kept, new_start[seg] + rank_in_head, new_offsets[-1]),
                           new_start[seg] + kept_head_t[seg] + clusters_t[seg] + within - head[seg])
        m_seg = segment_ids(n_clusters, self.device)
        m_within = torch.arange(num_merged, device=self.device) - per_sample(offsets(n_clusters)[:-1])[m_seg]
        dest = torch.cat([dest, new_start[m_seg] + kept_head_t[m_seg] + m_within])
        source = torch.empty(new_offsets[-1] + 1, dtype=torch.long, device=self.device)
        source.scatter_(0, dest, torch.arange(self.num_rows + num_merged, device=self.device))
        source = source[:-1]  # row of the extended stream (current rows, then merged) each new row takes
        is_merged = source >= self.num_rows
        rows = torch.arange(self.num_rows, device=self.device)
        position_source = torch.cat([rows, centre_rows])[source]  # a merged token sits at its centre

        hidden = torch.cat([hidden, merged])[source]
        positions = positions[:, position_source]
        rotary = tuple(t.index_select(-2, position_source) for t in rotary)
        self.visual_ids = torch.where(is_merged, MERGED, self.visual_ids[position_source])
        self.lengths, self.heads = new_lengths, [kh + c for kh, c in zip(kept_head, n_clusters)]
        self.visual = [k + c for k, c in zip(keep, n_clusters)]
        self._refresh()
        return hidden, positions, rotary

    def add_to_visual_rows(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """hidden (T, H) with residual[i] added to the row of original visual token i (pack order,
        as at layer 0), wherever pruning left that token; pruned tokens' residuals are dropped and
        merged tokens get none (they were merged from states that had the earlier ones)."""
        original = self.visual_ids >= 0
        index = torch.where(original, self._first_visual[self.row_sample] + self.visual_ids, 0)
        return hidden + residual.to(hidden.dtype)[index] * original[:, None]

    def kept_visual_positions(self) -> list[list[int]]:
        """Per sample, indices (among its original visual tokens) of those still in the stream."""
        ids = self.visual_ids.cpu()
        return [[i for i in ids[start:end].tolist() if i >= 0]
                for start, end in zip(self.offsets[:-1], self.offsets[1:])]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return to_device(tensor, self.device)
