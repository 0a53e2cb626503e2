"""Ragged helpers: per-sample segments of a packed stream, without host-device syncs.

Segment sizes are always known on the host (they follow from counts), so every helper
takes them as Python lists and never asks the device for a length.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the host: a pageable copy would wait for all queued GPU work."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return out


def segment_ids(sizes: list[int], device: torch.device) -> torch.Tensor:
    """(sum(sizes),) long: which segment each element belongs to."""
    counts = torch.tensor(sizes, dtype=torch.long)
    return to_device(torch.repeat_interleave(torch.arange(len(sizes)), counts), device)


def compact(mask: torch.Tensor, total: int) -> torch.Tensor:
    """Indices of the True entries of `mask`, in order, when their number `total` is known."""
    dest = torch.where(mask, mask.long().cumsum(0) - 1, total)
    out = torch.empty(total + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, dest, torch.arange(mask.shape[0], device=mask.device))
    return out[:total]


def pad_index(sizes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, max size) flat indices into the concatenated segments (0 where padded) and the valid mask."""
    width = max(sizes, default=0)
    starts = torch.tensor(offsets(sizes)[:-1], dtype=torch.long)[:, None]
    column = torch.arange(width)[None, :]
    valid = column < torch.tensor(sizes, dtype=torch.long)[:, None]
    index = torch.where(valid, starts + column, 0)
    return to_device(index, device), to_device(valid, device)


def rank_within_segments(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rank of every element inside its segment, 0 = highest score; ties go to the earlier
    element (stable), so the order never depends on what else is in the pack."""
    index, valid = pad_index(sizes, scores.device)
    padded = torch.where(valid, scores[index], float("-inf"))
    order = torch.sort(padded, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=scores.device).expand_as(order))
    return unpad(ranks, index, valid, scores.shape[0])


def unpad(padded: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of gathering with `pad_index`: (S, W, ...) back to (total, ...)."""
    out = padded.new_empty((total + 1, *padded.shape[2:]))
    dest = torch.where(valid, index, total).flatten()
    out[dest] = padded.flatten(0, 1)  # padded entries all land on the dropped last row
    return out[:total]
