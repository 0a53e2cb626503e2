"""The KV pool: allocated once, carved into per-sample blocks; the only code that indexes it.

One flat pool `(2, num_slots, num_kv_heads, head_dim)` holds every layer of every running
sample. A sample owns one contiguous block of slots, split layer by layer: layer l gets
what that layer sees of the prompt (pruning makes later layers hold fewer tokens) plus room
for the new tokens. Nothing is padded, so memory is proportional to what each layer of each
sample keeps. Blocks come from a first-fit free list (adjacent free runs merge on release);
the last slot is never handed out: padded decode rows write there. Slots are absolute
indices into the pool, so captured decode graphs stay valid for the pool's life.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVBlock:
    start: int  # first slot of the block
    layer_starts: tuple[int, ...]  # first slot of each layer's run
    layer_capacities: tuple[int, ...]  # slots of each layer's run

    @property
    def num_slots(self) -> int:
        return sum(self.layer_capacities)


class FreeList:
    """Free runs of a 1-D slot range, first fit, coalescing. Plain Python: unit-tested alone."""

    def __init__(self, num_slots: int):
        self._starts = [0] if num_slots else []
        self._sizes = [num_slots] if num_slots else []
        self.num_free = num_slots

    def allocate(self, size: int) -> int | None:
        """First slot of a free run of `size` slots, or None when no run is that large."""
        if size < 1:
            raise ValueError(f"cannot allocate {size} slots")
        for i, free in enumerate(self._sizes):
            if free >= size:
                start = self._starts[i]
                if free == size:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += size
                    self._sizes[i] -= size
                self.num_free -= size
                return start
        return None

    def release(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if (i < len(self._starts) and self._starts[i] < start + size) or \
                (i and self._starts[i - 1] + self._sizes[i - 1] > start):
            raise RuntimeError(f"slots {start}..{start + size} released twice or overlapping a free run")
        self._starts.insert(i, start)
        self._sizes.insert(i, size)
        self.num_free += size
        if i + 1 < len(self._starts) and start + size == self._starts[i + 1]:  # merge with the next run
            self._sizes[i] += self._sizes.pop(i + 1)
            self._starts.pop(i + 1)
        if i and self._starts[i - 1] + self._sizes[i - 1] == start:  # ... and with the previous one
            self._sizes[i - 1] += self._sizes.pop(i)
            self._starts.pop(i)

    @property
    def largest(self) -> int:
        return max(self._sizes, default=0)


class KVPool:
    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        """`num_slots` usable slots (one more, the spare, is added for padded decode rows)."""
        if num_slots < 1:
            raise ValueError(f"the KV pool needs at least one slot, got {num_slots}")
        self.pool = torch.empty((2, num_slots + 1, num_kv_heads, head_dim), dtype=dtype, device=device)
        self.capacity = num_slots
        self._free = FreeList(num_slots)

    @staticmethod
    def bytes_per_slot(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """One token at one layer (K and V)."""
        return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def spare_slot(self) -> int:
        return self.capacity

    @property
    def num_free(self) -> int:
        return self._free.num_free

    def allocate(self, layer_capacities: list[int] | tuple[int, ...]) -> KVBlock | None:
        """A block with `layer_capacities[l]` slots for layer l, or None while the pool is too full."""
        size = sum(layer_capacities)
        start = self._free.allocate(size)
        if start is None:
            return None
        starts, offset = [], start
        for capacity in layer_capacities:
            starts.append(offset)
            offset += capacity
        return KVBlock(start, tuple(starts), tuple(layer_capacities))

    def release(self, block: KVBlock) -> None:
        self._free.release(block.start, block.num_slots)

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (n, Hkv, D) go to the absolute slots `slot_mapping` (n,)."""
        self.pool[0].index_copy_(0, slot_mapping, k)
        self.pool[1].index_copy_(0, slot_mapping, v)

    @property
    def keys(self) -> torch.Tensor:
        return self.pool[0]

    @property
    def values(self) -> torch.Tensor:
        return self.pool[1]
