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
from .pruning.pack import PrunedPack
from .pruning.schedule import SamplePlan, budget_schedule, plan_sample, prefill_flops
from .pruning.scoring import VisualScorer, rater_attention_ranks
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
    plan: SamplePlan
    generator: torch.Generator | None
    cache_starts: list[int]  # first cache slot at each layer
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


class _SpanTimer:
    """Sums the time of several `with` spans; CUDA events on the GPU so nothing synchronises
    until `total_ms` (called after the pack's own sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self._host_ms = 0.0

    def __enter__(self):
        if self.cuda:
            self.spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.spans[-1][0].record()
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.spans[-1][1].record()
        else:
            self._host_ms += 1e3 * (time.perf_counter() - self._started)

    def total_ms(self) -> float:
        return sum(start.elapsed_time(end) for start, end in self.spans) if self.cuda else self._host_ms


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
        if self.config.compile_vision and self.device.type == "cuda":
            self.adapter.compile_vision()
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
        overrides the engine's default SparsityConfig for this call.
        """
        if isinstance(samples, dict):
            raise TypeError("generate takes a list of samples (one processor output dict each)")
        sparsity = sparsity or self.sparsity
        params_list = self._params_per_sample(params, len(samples))
        prepared = [self.adapter.prepare(sample, i) for i, sample in enumerate(samples)]
        num_layers = self.adapter.num_layers
        plans = [plan_sample(sparsity, num_layers, s.num_visual_tokens) for s in prepared]
        capacities = [self._layer_capacities(s, plan, p.max_new_tokens)
                      for s, plan, p in zip(prepared, plans, params_list)]
        results: list[GenerationResult | None] = [None] * len(samples)
        budget = self._max_cache_tokens() * num_layers
        for batch in group_consecutive([sum(c) for c in capacities], self.config.max_num_seqs, budget):
            running = self._run_batch([prepared[i] for i in batch], [params_list[i] for i in batch],
                                      [plans[i] for i in batch], [capacities[i] for i in batch], sparsity)
            for r in running:
                text = self.processor.decode(r.tokens, skip_special_tokens=True)
                results[r.sample.index] = GenerationResult(token_ids=r.tokens, text=text, stats=r.stats)
        return results

    # -- one batch: allocate, prefill packs, decode ---------------------------------------------------
    @staticmethod
    def _layer_capacities(sample: PreparedSample, plan: SamplePlan, max_new_tokens: int) -> list[int]:
        """Cache slots the sample needs at each layer: what the layer sees of the prompt, plus new tokens."""
        text = sample.num_tokens - sample.num_visual_tokens
        return [text + visual + max_new_tokens for visual in plan.visual_per_layer]

    def _run_batch(self, samples: list[PreparedSample], params: list[SamplingParams], plans: list[SamplePlan],
                   capacities: list[list[int]], sparsity: SparsityConfig) -> list[_Running]:
        by_layer = [list(per_layer) for per_layer in zip(*capacities)]
        cache = RaggedKVCache(by_layer, self.adapter.num_kv_heads, self.adapter.head_dim, self.dtype, self.device,
                              spare_slots=1, reuse=self._pool)
        self._pool = cache.pool
        running = []
        for b, (sample, p, plan) in enumerate(zip(samples, params, plans)):
            self._sample_counter += 1
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
            starts = [cache.starts[layer][b] for layer in range(self.adapter.num_layers)]
            running.append(_Running(sample, p, plan, make_generator(p, self.device, self._sample_counter), starts,
                                    stop_ids))
        for pack in group_consecutive([s.num_tokens for s in samples], len(samples), self.config.max_prefill_tokens):
            self._prefill([running[i] for i in pack], cache, sparsity)
        for r in running:  # plans are final now (rank-adaptive ones are decided during prefill)
            self._fill_plan_stats(r, sparsity)
        layer_starts = torch.tensor([r.cache_starts for r in running], dtype=torch.int32).T  # L, B
        prompt_lengths = torch.tensor([self._layer_capacities(r.sample, r.plan, 0) for r in running],
                                      dtype=torch.int32).T  # L, B: prompt tokens each layer cached
        while active := [i for i, r in enumerate(running) if not r.done]:
            self._decode_step([running[i] for i in active], cache, layer_starts[:, active], prompt_lengths[:, active])
        return running

    def _fill_plan_stats(self, r: _Running, sparsity: SparsityConfig) -> None:
        stats, plan, sample = r.stats, r.plan, r.sample
        stats.n_prompt_tokens = sample.num_tokens
        stats.n_visual_tokens = sample.num_visual_tokens
        stats.method = sparsity.label
        stats.n_visual_tokens_kept = plan.final_visual
        stats.kept_per_pruning_layer = {step.layer: step.keep + step.n_clusters for step in plan.steps}
        stats.equiv_visual_tokens = plan.equivalent_visual_tokens
        text = sample.num_tokens - sample.num_visual_tokens
        stats.prefill_flops = prefill_flops(self.adapter.text_config, text, plan.visual_per_layer)
        stats.prefill_flops_dense = prefill_flops(self.adapter.text_config, text,
                                                  (sample.num_visual_tokens,) * self.adapter.num_layers)

    def _prefill(self, pack: list[_Running], cache: RaggedKVCache, sparsity: SparsityConfig) -> None:
        started = self._now()
        samples = [r.sample for r in pack]
        features = self.adapter.encode_visual(samples, self.backend)
        vision_done = self._now()
        stream = PrunedPack(samples, [r.plan for r in pack], self.device)
        input_ids = self._to_device(torch.cat([s.input_ids for s in samples]))
        positions = self._to_device(torch.cat([s.positions for s in samples], dim=1))
        layer_starts = self._to_device(torch.tensor([r.cache_starts for r in pack], dtype=torch.long).T)  # L, S
        hidden = self.adapter.embed(input_ids, features)  # T, H
        scorer, sparse_time = None, _SpanTimer(self.device)
        if stream.pruning_layers:
            with sparse_time:
                scorer = VisualScorer(sparsity, samples, stream, hidden,
                                      self.adapter.rope_tables() if sparsity.method == "sparsevlm_v2" else None)
        rotary = self.adapter.rotary(hidden[None], positions)
        ctx = ForwardContext(cache, self.backend)
        with attention_implementation(self.adapter.text_config):
            for layer_idx, layer in enumerate(self.adapter.layers):
                ctx.prefill = PrefillMeta(
                    cu_seqlens=stream.cu_seqlens, cu_seqlens_list=stream.offsets, max_seqlen=stream.max_length,
                    slot_mapping=stream.slot_mapping(layer_starts[layer_idx]),
                    capture=layer_idx in stream.pruning_layers and sparsity.method != "random")
                hidden = self._layer(layer, hidden[None], rotary, ctx)[0]
                if layer_idx in stream.pruning_layers:
                    with sparse_time:
                        q, k = ctx.prefill.captured or (None, None)
                        vis_rows = stream.visual_rows()
                        scores = scorer.scores(stream, vis_rows, q, k, positions, self.adapter.attention_scale)
                        if sparsity.rank_adaptive:
                            self._adapt_keeps(pack, stream, layer_idx, scorer.weights, q, k, sparsity)
                        hidden, positions, rotary = stream.prune(layer_idx, scores, vis_rows, hidden, positions,
                                                                 rotary)
        last = stream.cu_seqlens[1:].long() - 1
        logits = self.adapter.lm_head(self.adapter.norm(hidden[last])).float()
        tokens = select_tokens(logits, [r.params for r in pack], [r.generator for r in pack]).tolist()
        kept_positions = stream.kept_visual_positions()
        finished = self._now()
        vision_ms = split_time(1e3 * (vision_done - started), [s.num_vision_patches for s in samples])
        prefill_ms = split_time(1e3 * (finished - vision_done), [s.num_tokens for s in samples])
        sparse_ms = split_time(sparse_time.total_ms(), [s.num_tokens for s in samples])
        for r, token, v_ms, p_ms, s_ms, kept in zip(pack, tokens, vision_ms, prefill_ms, sparse_ms, kept_positions):
            r.stats.vision_ms += v_ms
            r.stats.prefill_ms += p_ms
            r.stats.sparse_ms += s_ms
            r.stats.kept_visual_positions = kept
            r.commit(token)

    def _adapt_keeps(self, pack: list[_Running], stream: PrunedPack, layer: int, weights: torch.Tensor,
                     q: torch.Tensor, k: torch.Tensor, sparsity: SparsityConfig) -> None:
        """Rank-adaptive SparseVLM: keep floor(scale * rank(R) + bias) at this layer, at most the
        budget's count (the budget sized the cache, so it stays an upper bound)."""
        ranks = rater_attention_ranks(stream, weights, q, k, self.adapter.attention_scale)
        for index, (r, rank) in enumerate(zip(pack, ranks)):
            layers = [step.layer for step in r.plan.steps]
            if layer not in layers:
                continue
            position = layers.index(layer)
            budget = [keep for _, keep in budget_schedule(sparsity, self.adapter.num_layers,
                                                          r.sample.num_visual_tokens)]
            keeps = [step.keep for step in r.plan.steps[:position]]
            keeps.append(min(budget[position], max(1, int(sparsity.rank_scale * rank + sparsity.rank_bias))))
            plan = plan_sample(sparsity, self.adapter.num_layers, r.sample.num_visual_tokens,
                               keeps=keeps + budget[position + 1:])
            if any(new > old for new, old in zip(plan.visual_per_layer, r.plan.visual_per_layer)):
                raise RuntimeError("rank-adaptive plan outgrew the cache sized for its budget")  # cannot happen
            r.plan = plan
            stream.replan(index, plan)

    def _decode_step(self, batch: list[_Running], cache: RaggedKVCache, layer_starts: torch.Tensor,
                     prompt_lengths: torch.Tensor) -> None:
        """layer_starts, prompt_lengths: (L, B) int32 host tensors of the active samples."""
        started = time.perf_counter()
        tokens = torch.tensor([r.tokens[-1] for r in batch])
        generated = torch.tensor([len(r.tokens) for r in batch], dtype=torch.int32)  # the new token included
        positions = torch.tensor([r.sample.next_position + len(r.tokens) - 1 for r in batch])
        lengths = prompt_lengths + generated[None, :]
        slots = (layer_starts + lengths - 1).long()
        if self._graphs is not None and self._graphs.fits(len(batch)):
            logits = self._graphs.run(cache, tokens, positions, slots, layer_starts, lengths)
        else:
            logits = self.decode_logits(cache, *(self._to_device(t.contiguous())
                                                 for t in (tokens, positions, slots, layer_starts, lengths)))
        next_tokens = select_tokens(logits.float(), [r.params for r in batch], [r.generator for r in batch]).tolist()
        step_ms = 1e3 * (time.perf_counter() - started)  # .tolist() synchronised the device
        for r, token in zip(batch, next_tokens):
            r.stats.decode_ms += step_ms / len(batch)
            r.commit(token)

    def decode_logits(self, cache: RaggedKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One decode step on device tensors -> logits (B, V). tokens, positions (B,); slots,
        starts, lengths (L, B) per layer. Graph-capturable: no host syncs."""
        hidden = self.adapter.embed_tokens(tokens)[None]  # 1, B, H
        rotary = self.adapter.rotary(hidden, self.adapter.decode_positions(positions))
        ctx = ForwardContext(cache, self.backend, decode=DecodeMeta(slot_mapping=slots, starts=starts, lengths=lengths))
        with attention_implementation(self.adapter.text_config):
            for layer in self.adapter.layers:
                hidden = self._layer(layer, hidden, rotary, ctx)
        return self.adapter.lm_head(self.adapter.norm(hidden[0]))

    @staticmethod
    def _layer(layer, hidden: torch.Tensor, rotary, ctx: ForwardContext) -> torch.Tensor:
        return layer(hidden, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                     position_embeddings=rotary, sparsevlm_ctx=ctx)

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
        per_token = self.adapter.num_layers * RaggedKVCache.bytes_per_slot(self.adapter.num_kv_heads,
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
