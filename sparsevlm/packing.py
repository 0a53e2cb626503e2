"""Host-side planning over lengths: which samples run together. No tensors, unit-tested alone."""

from __future__ import annotations


def group_consecutive(sizes: list[int], max_items: int, max_total: int) -> list[list[int]]:
    """Split indices 0..n-1, in order, into groups of at most `max_items` whose sizes sum to
    at most `max_total`. An item larger than `max_total` gets a group of its own."""
    if max_items < 1:
        raise ValueError("max_items must be >= 1")
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if current and (len(current) == max_items or total + size > max_total):
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(current)
    return groups
