"""The ragged KV cache of one batch of samples: the only code that indexes cache tensors.

All layers share one pool `(num_layers, 2, num_slots, num_kv_heads, head_dim)`. Each
sample owns a contiguous run of slots sized for its prompt plus its new tokens; there is
no padding between samples, so memory is proportional to what each sample holds.
"""

from __future__ import annotations

import torch


def assign_slots(capacities: list[int]) -> list[int]:
    """First slot of each sample when runs of `capacities` slots are laid end to end."""
    starts, offset = [], 0
    for capacity in capacities:
        starts.append(offset)
        offset += capacity
    return starts


class RaggedKVCache:
    def __init__(self, num_layers: int, capacities: list[int], num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, spare_slots: int = 0, reuse: torch.Tensor | None = None):
        """`spare_slots` extra slots at the end absorb writes of padded (dummy) decode rows.
        `reuse`: a previous cache's pool, taken over when it has the room (saves the
        allocation and keeps captured decode graphs valid)."""
        self.starts = assign_slots(capacities)
        self.capacities = list(capacities)
        needed = sum(capacities) + spare_slots
        shape = (num_layers, 2, needed, num_kv_heads, head_dim)
        if (reuse is not None and reuse.shape[2] >= needed and reuse.shape[:2] == shape[:2]
                and reuse.shape[3:] == shape[3:] and reuse.dtype == dtype and reuse.device == torch.device(device)):
            self.pool = reuse
        else:
            self.pool = torch.empty(shape, dtype=dtype, device=device)
        self.num_slots = self.pool.shape[2]

    @property
    def spare_slot(self) -> int:
        return self.num_slots - 1

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (n, Hkv, D) go to `slot_mapping` (n,) of `layer`."""
        self.pool[layer, 0].index_copy_(0, slot_mapping, k)
        self.pool[layer, 1].index_copy_(0, slot_mapping, v)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[layer, 0], self.pool[layer, 1]
