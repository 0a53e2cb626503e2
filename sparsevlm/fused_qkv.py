"""The engine's decoder layers: transformers' own, with q, k and v projected by one GEMM.

A decode step multiplies a few dozen rows by every weight, so each projection is a pass over
its weight; at 7B shapes k and v (3.7 MB each) are too small to stream at the memory's pace on
their own (on the H200 ~0.7 TB/s against ~3.5 for the large GEMMs). One GEMM over the three
weights side by side reads the same bytes at the large GEMMs' pace.

`engine_layers` hands the engine shallow copies of the decoder layers whose attention is
`FusedQKVAttention`: the loaded model is untouched, so `model.generate` stays transformers'
own code, the engine's reference. The fused weight is the only copy: the loaded projections'
weights become views of it. A layer whose attention is not a plain q/k/v/o attention (the
projections' names, shapes or dtypes differ, or its module has no `apply_rotary_pos_emb`)
stays as loaded.
"""

from __future__ import annotations

import copy
import logging
import sys

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

logger = logging.getLogger(__name__)

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _module_function(attention: torch.nn.Module, name: str):
    """A function of the attention class's own module (`apply_rotary_pos_emb`, `eager_attention_forward`):
    the one its forward calls."""
    return getattr(sys.modules.get(type(attention).__module__), name, None)


def can_fuse(attention: torch.nn.Module) -> bool:
    linears = [getattr(attention, name, None) for name in PROJECTIONS]
    if not all(isinstance(m, torch.nn.Linear) for m in linears) or not hasattr(attention, "o_proj"):
        return False
    inputs = {m.in_features for m in linears}
    dtypes = {m.weight.dtype for m in linears}
    return len(inputs) == 1 and len(dtypes) == 1 and hasattr(attention, "head_dim") and \
        _module_function(attention, "apply_rotary_pos_emb") is not None


def _side_by_side(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """`tensors` (weights or biases) as one tensor along dim 0 if they already lie one after the
    other in one storage (joined by an earlier engine over the same model), else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or t.storage_offset() != offset:
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)


def _joined(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """One tensor along dim 0, and the only copy: the parameters become views of it."""
    joined = _side_by_side(parameters)
    if joined is None:
        joined = torch.cat([p.detach() for p in parameters])
        for p, part in zip(parameters, joined.split([p.shape[0] for p in parameters])):
            p.data = part
    return joined


class FusedQKVAttention(torch.nn.Module):
    """The forward of transformers' q/k/v/o decoder attentions (Llama, Qwen2, Qwen2.5-VL, Qwen3-VL:
    project, per-head q/k norms where the module has them, rotary, the routed attention function,
    o_proj) with the three projections as one `linear` over their weights side by side."""

    def __init__(self, attention: torch.nn.Module):
        super().__init__()
        if not can_fuse(attention):
            raise ValueError(f"{type(attention).__name__} is not a q/k/v/o attention FusedQKVAttention can take")
        self.attention = attention
        linears = [getattr(attention, name) for name in PROJECTIONS]
        self.sizes = [m.out_features for m in linears]
        with torch.no_grad():
            weight = _joined([m.weight for m in linears])
            biases = [m.bias for m in linears]
            if all(b is not None for b in biases):
                bias = _joined(biases)
            elif any(b is not None for b in biases):  # a copy, with zeros where a projection has none
                bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears])
            else:
                bias = None
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.rotate = _module_function(attention, "apply_rotary_pos_emb")
        self.eager = _module_function(attention, "eager_attention_forward")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
        for name in ("past_key_values", "cache"):  # the engine keeps its own cache
            if kwargs.pop(name, None) is not None:
                raise ValueError("the engine's fused attention takes no transformers cache")
        kwargs.pop("use_cache", None)
        kwargs.pop("cache_position", None)
        attention = self.attention
        leading = hidden_states.shape[:-1]
        heads = (*leading, -1, attention.head_dim)
        q, k, v = (t.view(heads) for t in F.linear(hidden_states, self.weight, self.bias).split(self.sizes, dim=-1))
        if hasattr(attention, "q_norm"):  # Qwen3: RMSNorm over each head before the rotary
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.contiguous().transpose(1, 2)
        q, k = self.rotate(q, k, *position_embeddings)
        call = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, self.eager)
        if getattr(attention, "sliding_window", None) is not None:
            kwargs["sliding_window"] = attention.sliding_window
        out, weights = call(attention, q, k, v, attention_mask, dropout=0.0, scaling=attention.scaling, **kwargs)
        return attention.o_proj(out.reshape(*leading, -1).contiguous()), weights


def engine_layers(layers) -> list[torch.nn.Module]:
    """Shallow copies of `layers` (parameters shared) with their attention's projections fused."""
    copies, kept = [], 0
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if attention is None or not can_fuse(attention):
            copies.append(layer)
            kept += 1
            continue
        twin = copy.copy(layer)
        twin._modules = dict(layer._modules)  # copy.copy shares the child dict: the loaded layer keeps its own
        twin._modules["self_attn"] = FusedQKVAttention(attention)
        copies.append(twin)
    if kept:
        logger.info("%d of %d decoder layers keep their own attention (no q/k/v to fuse)", kept, len(copies))
    return copies
