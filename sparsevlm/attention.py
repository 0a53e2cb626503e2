"""Attention inside HF decoder layers: packed varlen prefill and decode over the ragged cache.

The engine routes the decoder's attention once, at start-up (`route_text_attention`): the
text config names our dispatcher, which every decoder layer calls. Inside an engine forward
the layer carries our `ForwardContext` (a keyword argument passed to each layer): the
dispatcher writes K/V into the KV pool and runs the chosen backend. Without it (the model
called by anyone else, `model.generate` included) it is exactly transformers' SDPA, with
SDPA's own masks. The vision tower is routed per call instead (`attention_implementation`,
once per pack): naming a varlen function there changes how transformers' own vision code
splits windows, and `model.generate` must keep its own path as the reference.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.window_attention import MAX_WINDOW

from .kv_cache import KVPool

logger = logging.getLogger(__name__)

DISPATCH_NAME = "sparsevlm_dispatch"
# transformers' Qwen-VL vision towers hand cu_seqlens to the attention function only when its
# name contains "flash"; otherwise they loop over every window in Python (~100 ms per image).
VISION_ATTENTION_NAME = "sparsevlm_varlen_flash"


@dataclass
class PrefillMeta:
    """One layer of a packed prefill: samples concatenated along T (T shrinks after pruning)."""

    cu_seqlens: torch.Tensor  # (n+1,) int32, on device
    cu_seqlens_list: list[int]  # the same on the host (the SDPA path slices with it)
    max_seqlen: int
    slot_mapping: torch.Tensor  # (T,) long: cache slot of every packed token at this layer
    capture: bool = False  # keep this layer's post-RoPE q, k (a pruning layer scores with them)
    captured: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class DecodeMeta:
    """One layer of a decode step: one new token per active sample (each layer has its own
    cache lengths, so the runner hands every layer its own)."""

    slot_mapping: torch.Tensor  # (B,) long: where the new token's K/V goes
    starts: torch.Tensor  # (B,) int32: first cache slot of each sample
    lengths: torch.Tensor  # (B,) int32: cached tokens including the new one


@dataclass
class ForwardContext:
    cache: KVPool
    backend: "AttentionBackend"
    prefill: PrefillMeta | None = None
    decode: DecodeMeta | None = None


class AttentionBackend:
    """Prefill: flash-attn varlen, torch varlen (CUDA) or SDPA per sample; with `batched_prefill` on CUDA, a
    pack of equal-length samples as one batched cuDNN call. Decode: Triton on CUDA, torch on CPU.
    Vision attention with `fused_vision` on CUDA: windows of <= 64 tokens through our Triton kernel,
    equal-length segments (a pack of same-size images) as one batched cuDNN call."""

    def __init__(self, name: str, device: torch.device, fused_vision: bool = True, batched_prefill: bool = False):
        self.name = name
        self.device = device
        self.fused_vision = fused_vision and device.type == "cuda"
        self.batched_prefill = batched_prefill and device.type == "cuda"
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            self._flash = flash_attn_varlen_func
        if name == "torch_varlen":
            from torch.nn.attention.varlen import varlen_attn

            self._varlen = varlen_attn
            params = inspect.signature(varlen_attn).parameters
            self._varlen_gqa = "enable_gqa" in params
            self._varlen_causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    @classmethod
    def choose(cls, device: torch.device, requested: str = "auto", fused_vision: bool = True,
               batched_prefill: bool = False) -> "AttentionBackend":
        if requested != "auto":
            if requested not in ("flash_attn", "torch_varlen", "sdpa"):
                raise ValueError(f"unknown attention backend {requested!r}; use auto, flash_attn, torch_varlen or sdpa")
            if requested != "sdpa" and device.type != "cuda":
                raise ValueError(f"attention backend {requested!r} needs a CUDA device, got {device}")
            backend = cls(requested, device)
            reason = "requested"
        elif device.type != "cuda":
            backend, reason = cls("sdpa", device), "not on CUDA"
        else:
            try:
                backend, reason = cls("flash_attn", device), "flash-attn is installed"
            except ImportError:
                try:
                    backend, reason = cls("torch_varlen", device), "flash-attn not installed; torch varlen_attn present"
                except ImportError:
                    backend, reason = cls("sdpa", device), "neither flash-attn nor torch varlen_attn available"
        backend.fused_vision = fused_vision and device.type == "cuda"
        backend.batched_prefill = batched_prefill and device.type == "cuda"
        logger.info("attention backend: %s (%s)", backend.name, reason)
        return backend

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PrefillMeta,
                scale: float) -> torch.Tensor:
        """q: (T, Hq, D), k/v: (T, Hq or Hkv, D) -> (T, Hq, D), causal within each sample. With
        `batched_prefill`, a pack whose samples are all of one length (at this layer) runs as one
        batched SDPA call (cuDNN's fused attention) instead of the varlen call."""
        samples = len(meta.cu_seqlens_list) - 1
        if self.batched_prefill and samples > 1 and samples * meta.max_seqlen == q.shape[0]:
            return torch.ops.sparsevlm.equal_segments_attention(q, k, v, meta.max_seqlen, scale, True)
        return self.varlen(q, k, v, meta.cu_seqlens, meta.cu_seqlens_list, meta.max_seqlen, scale, causal=True)

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               cu_seqlens_list: list[int] | None, max_seqlen: int, scale: float, causal: bool) -> torch.Tensor:
        if self.name == "flash_attn":
            return self._flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale,
                               causal=causal)
        if self.name == "torch_varlen":
            if not self._varlen_gqa and k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            extra = {"enable_gqa": True} if self._varlen_gqa else {}
            if causal:
                extra.update(self._varlen_causal)
            return self._varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **extra)
        if cu_seqlens_list is None:
            cu_seqlens_list = cu_seqlens.tolist()
        return prefill_attention_reference(q, k, v, cu_seqlens_list, scale, causal=causal)

    def vision(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int, scale: float) -> torch.Tensor:
        """Bidirectional attention within each segment (a vision tower's windows or images)."""
        if self.fused_vision and max_seqlen <= MAX_WINDOW:
            return torch.ops.sparsevlm.window_attention(q, k, v, cu_seqlens, scale)
        if self.fused_vision and (cu_seqlens.numel() - 1) * max_seqlen == q.shape[0]:  # all of one length
            return torch.ops.sparsevlm.equal_segments_attention(q, k, v, max_seqlen, scale)
        return self.varlen(q, k, v, cu_seqlens, None, max_seqlen, scale, causal=False)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, starts: torch.Tensor,
               lengths: torch.Tensor, scale: float) -> torch.Tensor:
        if q.device.type == "cuda":
            return decode_attention(q, k_cache, v_cache, starts, lengths, scale)
        return decode_attention_reference(q, k_cache, v_cache, starts, lengths, scale)


def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                                scale: float, causal: bool = True) -> torch.Tensor:
    """Per-sample SDPA over a packed stream: the definition the varlen kernels must match."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # 1, H, L, D
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale,
                                                        enable_gqa=True)[0].transpose(0, 1)
    return out


@torch.library.custom_op("sparsevlm::equal_segments_attention", mutates_args=())
def equal_segments_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                             scale: float, causal: bool = False) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) packed as T / length segments of `length` tokens -> attention
    within each (bidirectional, or causal), as one batched SDPA (GQA when Hkv < Hq): cuDNN's fused
    attention on CUDA, an opaque op inside compiled blocks. On the H200 ~1.5x FlashAttention-2 at the
    vision towers' head dim of 80 (benchmarks/vision_kernels.py); on an H100 2.6x torch's varlen call
    for a causal pack of 29 x 1121 tokens at the decoder's 28/4 heads of 128
    (benchmarks/prefill_attention.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batched = [t.reshape(-1, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]
    options = {"scale": scale, "is_causal": causal, "enable_gqa": k.shape[1] != q.shape[1]}
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
            out = F.scaled_dot_product_attention(*batched, **options)
    else:  # fp32, or CPU: whatever SDPA has for it
        out = F.scaled_dot_product_attention(*batched, **options)
    return out.transpose(1, 2).reshape(q.shape)


@equal_segments_attention.register_fake
def _(q, k, v, length, scale, causal=False):
    return torch.empty_like(q)


@torch.compiler.disable
def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sparsevlm_ctx: ForwardContext | None = None, **kwargs):
    """transformers attention signature: q (1, Hq, T, D), k/v (1, Hkv, T, D) -> ((1, T, Hq, D), None).

    Never traced: compiled decoder layers break their graph here and run it as it is, so the
    KV pool's in-place writes stay writes (a traced mutation of the pool could be functionalised
    into a copy of all of it)."""
    if sparsevlm_ctx is None:
        raise RuntimeError("sparsevlm packed attention was called outside VLMEngine; "
                           "call the model through VLMEngine.generate or use model.generate")
    ctx = sparsevlm_ctx
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # T, H, D
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if ctx.prefill is not None:
        ctx.cache.write(ctx.prefill.slot_mapping, k, v)
        out = ctx.backend.prefill(q, k, v, ctx.prefill, scale)
        if ctx.prefill.capture:
            ctx.prefill.captured = (q, k)
    else:
        meta = ctx.decode
        ctx.cache.write(meta.slot_mapping, k, v)
        out = ctx.backend.decode(q.contiguous(), ctx.cache.keys, ctx.cache.values, meta.starts, meta.lengths, scale)
    return out[None], None


def vision_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            cu_seq_lens_q=None, max_length_q=None, sparsevlm_backend: AttentionBackend | None = None,
                            **kwargs):
    """Bidirectional varlen attention for the vision tower: q/k/v (1, H, T, D) -> ((1, T, H, D), None)."""
    if sparsevlm_backend is None or cu_seq_lens_q is None:
        raise RuntimeError("sparsevlm vision attention needs cu_seqlens and a backend; run it through VLMEngine")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    cu_seqlens = cu_seq_lens_q.to(torch.int32)
    out = sparsevlm_backend.vision(q, k, v, cu_seqlens, int(max_length_q), scale)
    return out[None], None


def dispatch_attention(module, query, key, value, attention_mask, sparsevlm_ctx: ForwardContext | None = None,
                       **kwargs):
    """The decoder's attention for good: ours inside an engine forward, transformers' SDPA otherwise."""
    if sparsevlm_ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return packed_attention(module, query, key, value, attention_mask, sparsevlm_ctx=sparsevlm_ctx, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DISPATCH_NAME, dispatch_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DISPATCH_NAME, sdpa_mask)  # outside the engine: SDPA's masks
    AttentionInterface.register(VISION_ATTENTION_NAME, vision_varlen_attention)


_register()


def route_text_attention(text_config) -> None:
    """Once per engine: the decoder layers built from `text_config` call `dispatch_attention`."""
    if text_config._attn_implementation not in (DISPATCH_NAME, "sdpa"):
        logger.warning("model loaded with attention %r; outside the engine it now runs SDPA",
                       text_config._attn_implementation)
    text_config._attn_implementation = DISPATCH_NAME


@contextlib.contextmanager
def attention_implementation(config, name: str = VISION_ATTENTION_NAME):
    """Route the attention of modules built from `config` to our function `name` for one call."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
