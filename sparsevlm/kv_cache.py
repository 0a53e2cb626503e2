"""The ragged KV cache of one batch of samples: the only code that indexes cache tensors.

One flat pool `(2, num_slots, num_kv_heads, head_dim)` holds every layer: layer l owns a
region, and inside it each sample owns a contiguous run of slots sized for what that
layer saw of its prompt (pruning makes later layers hold fewer tokens) plus its new
tokens. Nothing is padded, so memory is proportional to what each layer of each sample
keeps. Slots are absolute indices into the pool.
"""

from __future__ import annotations

import torch


def layer_major_starts(capacities: list[list[int]]) -> list[list[int]]:
    """capacities[l][b] slots for sample b at layer l -> first slot of each, laid out layer by layer."""
    starts, offset = [], 0
    for per_sample in capacities:
        row = []
        for capacity in per_sample:
            row.append(offset)
            offset += capacity
        starts.append(row)
    return starts


class RaggedKVCache:
    def __init__(self, capacities: list[list[int]], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, spare_slots: int = 0, reuse: torch.Tensor | None = None):
        """`capacities[l][b]`: slots of sample b at layer l. `spare_slots` extra slots at the
        end absorb writes of padded (dummy) decode rows. `reuse`: a previous cache's pool,
        taken over when it has the room (saves the allocation and keeps captured decode
        graphs valid)."""
        self.capacities = [list(c) for c in capacities]
        self.starts = layer_major_starts(self.capacities)
        needed = sum(map(sum, self.capacities)) + spare_slots
        shape = (2, needed, num_kv_heads, head_dim)
        if (reuse is not None and reuse.shape[1] >= needed and reuse.shape[0] == 2
                and reuse.shape[2:] == shape[2:] and reuse.dtype == dtype and reuse.device == torch.device(device)):
            self.pool = reuse
        else:
            self.pool = torch.empty(shape, dtype=dtype, device=device)
        self.num_slots = self.pool.shape[1]

    @property
    def spare_slot(self) -> int:
        return self.num_slots - 1

    @staticmethod
    def bytes_per_slot(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """One token at one layer (K and V)."""
        return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

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
