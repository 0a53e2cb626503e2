"""VLMEngine: batched VLM inference on transformers' own modules, with our execution.

    engine = VLMEngine.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    results = engine.generate(samples, SamplingParams(max_new_tokens=16))

A call plans batches (host-side, over lengths), then for each batch: allocates the ragged
KV cache, prefills packs of samples (vision tower over the pack's images and videos, one
varlen stream through the decoder layers), and decodes all unfinished samples together
until each stops. The engine owns the loop; the adapter owns the family specifics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import ModelAdapter, PreparedSample, adapter_class_for
from .attention import AttentionBackend, DecodeMeta, ForwardContext, PrefillMeta, attention_implementation
from .config import EngineConfig, SamplingParams, SparsityConfig
from .decode_graphs import DecodeGraphs
from .kv_cache import RaggedKVCache
from .packing import group_consecutive
from .preprocess import QwenVLProcessor
from .sampling import make_generator, select_tokens
from .stats import SampleStats, split_time

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only; ends with the stop token when one was hit
    text: str
    stats: SampleStats


@dataclass
class _Running:
    """One sample while its batch runs."""

    sample: PreparedSample
    params: SamplingParams
    generator: torch.Generator | None
    cache_start: int
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    stats: SampleStats = field(default_factory=SampleStats)

    @property
    def done(self) -> bool:
        return bool(self.stats.finish_reason)

    def commit(self, token: int) -> None:
        self.tokens.append(token)
        self.stats.n_generated_tokens = len(self.tokens)
        if token in self.stop_ids:
            self.stats.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.stats.finish_reason = "length"


class VLMEngine:
    def __init__(self, model, processor, sparsity: SparsityConfig | None = None,
                 engine_config: EngineConfig | None = None):
        self.model = model
        self.processor = processor
        self.sparsity = sparsity or SparsityConfig()
        self.config = engine_config or EngineConfig()
        self.adapter: ModelAdapter = adapter_class_for(model.config.model_type)(model)
        self.device = self.adapter.lm_head.weight.device
        self.dtype = self.adapter.lm_head.weight.dtype
        self.backend = AttentionBackend.choose(self.device, self.config.attention_backend)
        eos = model.generation_config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._check_processor_matches()
        self._graphs = (DecodeGraphs(self) if self.config.cuda_graphs and self.device.type == "cuda" else None)
        self._sample_counter = 0
        self._pool: torch.Tensor | None = None  # the KV pool, kept across batches

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device | None = None, sparsity: SparsityConfig | None = None,
                        engine_config: EngineConfig | None = None, trust_remote_code: bool = False,
                        **model_kwargs) -> "VLMEngine":
        """Load weights (safetensors only) and processor from a local path or hub id."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        adapter_class_for(config.model_type)  # fail before loading weights
        model = AutoModelForImageTextToText.from_pretrained(
            path_or_id, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=model_kwargs.pop("attn_implementation", "sdpa"), device_map=device, **model_kwargs)
        processor = QwenVLProcessor.from_pretrained(path_or_id, model_type=config.model_type)
        return cls(model.eval(), processor, sparsity=sparsity, engine_config=engine_config)

    def _check_processor_matches(self) -> None:
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            return
        config = self.model.config
        for token, expected in (("<|image_pad|>", config.image_token_id), ("<|video_pad|>", config.video_token_id)):
            found = tokenizer.convert_tokens_to_ids(token)
            if found != expected:
                raise ValueError(f"processor maps {token} to id {found} but the model expects {expected}: model and "
                                 "processor come from different checkpoints (load both from the same path)")
        if len(tokenizer) > self.adapter.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {self.adapter.vocab_size}: "
                             "model and processor come from different checkpoints")

    # -- public API --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, samples: list[dict], params: SamplingParams | list[SamplingParams] | None = None,
                 sparsity: SparsityConfig | None = None) -> list[GenerationResult]:
        """Generate for every sample; results come back in input order.

        `params`: one SamplingParams for all samples or one per sample. `sparsity`
        overrides the engine's default for this call (only "none" exists so far).
        """
        if isinstance(samples, dict):
            raise TypeError("generate takes a list of samples (one processor output dict each)")
        params_list = self._params_per_sample(params, len(samples))
        prepared = [self.adapter.prepare(sample, i) for i, sample in enumerate(samples)]
        capacities = [s.num_tokens + p.max_new_tokens for s, p in zip(prepared, params_list)]
        results: list[GenerationResult | None] = [None] * len(samples)
        for batch in group_consecutive(capacities, self.config.max_num_seqs, self._max_cache_tokens()):
            running = self._run_batch([prepared[i] for i in batch], [params_list[i] for i in batch],
                                      [capacities[i] for i in batch])
            for r in running:
                text = self.processor.decode(r.tokens, skip_special_tokens=True)
                results[r.sample.index] = GenerationResult(token_ids=r.tokens, text=text, stats=r.stats)
        return results

    # -- one batch: allocate, prefill packs, decode ---------------------------------------------------
    def _run_batch(self, samples: list[PreparedSample], params: list[SamplingParams],
                   capacities: list[int]) -> list[_Running]:
        cache = RaggedKVCache(self.adapter.num_layers, capacities, self.adapter.num_kv_heads, self.adapter.head_dim,
                              self.dtype, self.device, spare_slots=1, reuse=self._pool)
        self._pool = cache.pool
        running = []
        for sample, p, start in zip(samples, params, cache.starts):
            self._sample_counter += 1
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
            running.append(_Running(sample, p, make_generator(p, self.device, self._sample_counter), start, stop_ids))
            running[-1].stats.n_prompt_tokens = sample.num_tokens
            running[-1].stats.n_visual_tokens = sample.num_visual_tokens
        for pack in group_consecutive([s.num_tokens for s in samples], len(samples), self.config.max_prefill_tokens):
            self._prefill([running[i] for i in pack], cache)
        while active := [r for r in running if not r.done]:
            self._decode_step(active, cache)
        return running

    def _prefill(self, pack: list[_Running], cache: RaggedKVCache) -> None:
        started = self._now()
        features = self.adapter.encode_visual([r.sample for r in pack], self.backend)
        vision_done = self._now()
        lengths = [r.sample.num_tokens for r in pack]
        cu_seqlens = [0]
        for length in lengths:
            cu_seqlens.append(cu_seqlens[-1] + length)
        slots = torch.cat([torch.arange(r.cache_start, r.cache_start + n) for r, n in zip(pack, lengths)])
        input_ids = self._to_device(torch.cat([r.sample.input_ids for r in pack]))
        positions = self._to_device(torch.cat([r.sample.positions for r in pack], dim=1))
        meta = PrefillMeta(cu_seqlens=self._to_device(torch.tensor(cu_seqlens, dtype=torch.int32)),
                           cu_seqlens_list=cu_seqlens, max_seqlen=max(lengths), slot_mapping=self._to_device(slots))
        hidden = self.adapter.embed(input_ids, features)[None]  # 1, T, H
        position_embeddings = self.adapter.rotary(hidden, positions)
        hidden = self._run_layers(hidden, position_embeddings, ForwardContext(cache, self.backend, prefill=meta))
        last = self._to_device(torch.tensor(cu_seqlens[1:]) - 1)
        logits = self.adapter.lm_head(self.adapter.norm(hidden[0, last])).float()
        tokens = select_tokens(logits, [r.params for r in pack], [r.generator for r in pack]).tolist()
        finished = self._now()
        vision_ms = split_time(1e3 * (vision_done - started), [r.sample.num_vision_patches for r in pack])
        prefill_ms = split_time(1e3 * (finished - vision_done), lengths)
        for r, token, v_ms, p_ms in zip(pack, tokens, vision_ms, prefill_ms):
            r.stats.vision_ms += v_ms
            r.stats.prefill_ms += p_ms
            r.commit(token)

    def _decode_step(self, batch: list[_Running], cache: RaggedKVCache) -> None:
        started = time.perf_counter()
        tokens = torch.tensor([r.tokens[-1] for r in batch])
        n_cached = [r.sample.num_tokens + len(r.tokens) - 1 for r in batch]  # before this step's token
        positions = torch.tensor([r.sample.next_position + len(r.tokens) - 1 for r in batch])
        slots = torch.tensor([r.cache_start + n for r, n in zip(batch, n_cached)])
        starts = torch.tensor([r.cache_start for r in batch], dtype=torch.int32)
        lengths = torch.tensor([n + 1 for n in n_cached], dtype=torch.int32)
        if self._graphs is not None and self._graphs.fits(len(batch)):
            logits = self._graphs.run(cache, tokens, positions, slots, starts, lengths)
        else:
            logits = self.decode_logits(cache, *(self._to_device(t) for t in (tokens, positions, slots, starts, lengths)))
        next_tokens = select_tokens(logits.float(), [r.params for r in batch], [r.generator for r in batch]).tolist()
        step_ms = 1e3 * (time.perf_counter() - started)  # .tolist() synchronised the device
        for r, token in zip(batch, next_tokens):
            r.stats.decode_ms += step_ms / len(batch)
            r.commit(token)

    def decode_logits(self, cache: RaggedKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One decode step on device tensors (B,) -> logits (B, V). Graph-capturable: no host syncs."""
        hidden = self.adapter.embed_tokens(tokens)[None]  # 1, B, H
        position_embeddings = self.adapter.rotary(hidden, self.adapter.decode_positions(positions))
        meta = DecodeMeta(slot_mapping=slots, starts=starts, lengths=lengths)
        hidden = self._run_layers(hidden, position_embeddings, ForwardContext(cache, self.backend, decode=meta))
        return self.adapter.lm_head(self.adapter.norm(hidden[0]))

    def _run_layers(self, hidden: torch.Tensor, position_embeddings, ctx: ForwardContext) -> torch.Tensor:
        with attention_implementation(self.adapter.text_config):
            for layer in self.adapter.layers:
                hidden = layer(hidden, attention_mask=None, position_ids=None, past_key_values=None,
                               use_cache=False, position_embeddings=position_embeddings, sparsevlm_ctx=ctx)
        return hidden

    # -- helpers --------------------------------------------------------------------------------------
    def _params_per_sample(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} samples; pass one, or one per sample")
        return params

    def _max_cache_tokens(self) -> int:
        if self.config.max_cache_tokens is not None:
            return self.config.max_cache_tokens
        per_token = RaggedKVCache.bytes_per_token(self.adapter.num_layers, self.adapter.num_kv_heads,
                                                  self.adapter.head_dim, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * self.config.cache_memory_fraction) // per_token)
        return 1 << 20

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
