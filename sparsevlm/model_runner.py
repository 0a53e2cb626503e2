"""Runs the model for the engine: packed prefill (vision tower, pruning) and batched decode.

Owns everything on the device: the attention backend, the KV pool (sized once, at start-up),
the decode graphs (captured once) and the decoder that queues decode steps through them, one
ahead of the host (sparsevlm/decoding.py). The scheduler decides who runs; this module only
runs them and reports each one's first or next token. One host sync per step: reading the
chosen tokens. Timings come from CUDA events read after that sync, so measuring adds none.
"""

from __future__ import annotations

import logging
import time

import torch

from .adapters import ModelAdapter
from .adapters.base import compiler_failure
from .attention import AttentionBackend, DecodeMeta, ForwardContext, PrefillMeta, route_text_attention
from .config import EngineConfig, SparsityConfig
from .decode_graphs import DecodeGraphs, DecodeInputs
from .decoding import Decoder
from .fp8 import check_fp8_device
from .fused_qkv import engine_layers
from .kv_cache import KVPool
from .pruning.pack import PrunedPack
from .pruning.ragged import to_device
from .pruning.schedule import budget_schedule, plan_sample, prefill_flops
from .pruning.scoring import VisualScorer, rater_attention_ranks
from .sampling import make_generator, select_tokens
from .scheduler import Sequence
from .stats import split_time

logger = logging.getLogger(__name__)
CPU_CACHE_TOKENS = 1 << 16  # KV tokens per layer on CPU when EngineConfig.max_cache_tokens is unset


class _Clock:
    """Points on the device's timeline (CUDA events; host time on CPU), read after a sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)


def compiled_layers(layers, backend: str = "inductor") -> list:
    """`layers` torch.compile'd for the engine's forwards, one compilation for all of them: a layer's
    code is the same at every depth, and once a second token count has been seen that dimension is
    dynamic, so every decode bucket (and prefill pack) shares the graphs.

    At decode batch sizes a layer is ~50 small kernels whose fixed costs outweigh its weights'
    streaming; compiled, its norms, rotary and activation fuse around the GEMMs. Our attention
    breaks the graph (`packed_attention` is never traced), so each layer compiles as the pieces
    before and after it. `model.generate` keeps the modules as loaded."""
    return [torch.compile(layer, backend=backend) for layer in layers]


class ModelRunner:
    def __init__(self, adapter: ModelAdapter, config: EngineConfig):
        self.adapter = adapter
        self.config = config
        self.device = adapter.lm_head.weight.device
        self.dtype = adapter.lm_head.weight.dtype
        self.backend = AttentionBackend.choose(self.device, config.attention_backend, fused_vision=config.fused_vision,
                                               batched_prefill=config.batched_prefill_attention)
        self.clock = _Clock(self.device)
        route_text_attention(adapter.text_config)
        if config.compile_vision and self.device.type == "cuda":
            adapter.compile_vision()
        if config.fused_vision and self.device.type == "cuda":
            adapter.fuse_vision()
        if config.vision_fp8:
            check_fp8_device(self.device)
            logger.info("vision tower: %d linear layers in FP8 (e4m3, per-row scales)", adapter.quantize_vision())
        self.pool = KVPool(self._pool_slots(), adapter.num_kv_heads, adapter.head_dim, self.dtype, self.device)
        self.decode_inputs = DecodeInputs(adapter.num_layers)
        ahead = config.decode_ahead if config.decode_ahead is not None else self.device.type == "cuda"
        self.decoder = Decoder(self, ahead=ahead)
        self.layers = engine_layers(adapter.layers) if config.fuse_qkv else list(adapter.layers)
        compiled = compiled_layers(self.layers) if self.device.type == "cuda" and (
            config.compile_decode or config.compile_prefill) else None
        self.decode_layers = compiled if compiled and config.compile_decode else self.layers
        self.prefill_layers = compiled if compiled and config.compile_prefill else self.layers
        self.graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            self._capture_decode_graphs()

    def _capture_decode_graphs(self) -> None:
        """Decode graphs per bucket, over compiled layers if asked; a compiled layer that fails to
        trace or capture costs its speed, not the engine: the eager layers are exact too."""
        config = self.config
        largest = min(config.max_num_seqs, max(config.graph_batch_buckets))
        buckets = sorted({b for b in config.graph_batch_buckets if b < largest} | {largest})
        try:
            self.graphs = DecodeGraphs(self, buckets)
            self.graphs.capture_all()
        except Exception as error:  # noqa: BLE001 - any compiler failure; eager capture re-raises real faults
            if self.decode_layers == self.layers:
                raise
            logger.warning("compiled decode layers failed (%s: %s); decoding with eager layers",
                           type(error).__name__, error)
            self.decode_layers = self.layers
            self.graphs = DecodeGraphs(self, buckets)
            self.graphs.capture_all()

    @staticmethod
    def _check_feature_rows(samples, features) -> None:
        """The tower gave one row per visual placeholder (shapes only: no sync). On CUDA a mismatch
        would otherwise surface as a device-side assert that breaks the whole GPU context."""
        produced = sum(rows.shape[0] for rows in features.by_token_id.values())
        expected = sum(s.num_visual_tokens for s in samples)
        if produced != expected:
            import transformers

            raise RuntimeError(f"the vision tower returned {produced} feature rows for {expected} visual "
                               f"placeholder tokens (transformers {transformers.__version__}): the adapter does "
                               "not match this transformers version's feature layout")

    def _pool_slots(self) -> int:
        layers = self.adapter.num_layers
        if self.config.max_cache_tokens is not None:
            return self.config.max_cache_tokens * layers
        if self.device.type != "cuda":
            return CPU_CACHE_TOKENS * layers
        free, total = torch.cuda.mem_get_info(self.device)
        if self.config.gpu_share < 1:  # engines beside this one on the GPU load and size their pools too
            free = min(free, int(total * self.config.gpu_share) - torch.cuda.memory_reserved(self.device))
        per_slot = KVPool.bytes_per_slot(self.adapter.num_kv_heads, self.adapter.head_dim, self.dtype)
        slots = int(free * self.config.cache_memory_fraction) // per_slot
        logger.info("KV pool: %d slots (%.1f GB, %d tokens per layer)", slots, slots * per_slot / 1e9,
                    slots // layers)
        return slots

    # -- prefill -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, pack: list[Sequence]) -> list[int]:
        """Vision tower, packed decoder pass with pruning, first token of each sequence.

        A compiler failure in the compiled prefill layers (tracing or backend: never a device fault)
        gives them up for good, logged, and the pack runs again through the uncompiled layers: its
        cache slots are written anew and its plans restored (rank-adaptive pruning replans)."""
        plans = [seq.plan for seq in pack]
        try:
            return self._prefill(pack)
        except torch._dynamo.exc.TorchDynamoException as error:
            if self.prefill_layers == self.layers:
                raise
            logger.warning("the compiled decoder layers failed on a prefill pack (%s); prefill runs them "
                           "uncompiled from now on", compiler_failure(error))
            self.prefill_layers = self.layers
            for seq, plan in zip(pack, plans):
                seq.plan = plan
            return self._prefill(pack)

    def _prefill(self, pack: list[Sequence]) -> list[int]:
        sparsity = pack[0].sparsity
        for seq in pack:
            seq.generator = make_generator(seq.params, self.device, seq.seed)
        started = self.clock.mark()
        samples = [seq.sample for seq in pack]
        features = self.adapter.encode_visual(samples, self.backend)
        self._check_feature_rows(samples, features)
        vision_done = self.clock.mark()
        stream = PrunedPack(samples, [seq.plan for seq in pack], self.device)
        input_ids = to_device(torch.cat([s.input_ids for s in samples]), self.device)
        positions = to_device(torch.cat([s.positions for s in samples], dim=1), self.device)
        layer_starts = torch.tensor([seq.block.layer_starts for seq in pack], dtype=torch.long).T
        layer_starts = to_device(layer_starts, self.device)
        hidden = self.adapter.embed(input_ids, features)  # T, H
        residuals = self.adapter.visual_residuals(input_ids, features)
        scorer, sparse_spans = None, []
        if stream.pruning_layers:
            sparse_spans.append(self.clock.mark())
            scorer = VisualScorer(sparsity, samples, stream, hidden,
                                  self.adapter.rope_tables() if sparsity.method == "sparsevlm_v2" else None)
            sparse_spans.append(self.clock.mark())
        rotary = self.adapter.rotary(hidden[None], positions)
        ctx = ForwardContext(self.pool, self.backend)
        for layer_idx, layer in enumerate(self.prefill_layers):
            ctx.prefill = PrefillMeta(
                cu_seqlens=stream.cu_seqlens, cu_seqlens_list=stream.offsets, max_seqlen=stream.max_length,
                slot_mapping=stream.slot_mapping(layer_starts[layer_idx]),
                capture=layer_idx in stream.pruning_layers and sparsity.method != "random")
            hidden = self._layer(layer, hidden[None], rotary, ctx)[0]
            if layer_idx < len(residuals):  # before this layer's pruning: every visual token gets its own
                hidden = stream.add_to_visual_rows(hidden, residuals[layer_idx])
            if layer_idx in stream.pruning_layers:
                sparse_spans.append(self.clock.mark())
                q, k = ctx.prefill.captured or (None, None)
                vis_rows = stream.visual_rows()
                scores = scorer.scores(stream, vis_rows, q, k, positions, self.adapter.attention_scale)
                if sparsity.rank_adaptive:
                    self._adapt_keeps(pack, stream, layer_idx, scorer.weights, q, k, sparsity)
                hidden, positions, rotary = stream.prune(layer_idx, scores, vis_rows, hidden, positions, rotary)
                sparse_spans.append(self.clock.mark())
        last = stream.cu_seqlens[1:].long() - 1
        logits = self.adapter.lm_head(self.adapter.norm(hidden[last])).float()
        finished = self.clock.mark()
        tokens = select_tokens(logits, [seq.params for seq in pack], [seq.generator for seq in pack]).tolist()
        kept_positions = stream.kept_visual_positions()
        sparse_total = sum(self.clock.ms(a, b) for a, b in zip(sparse_spans[::2], sparse_spans[1::2]))
        vision_ms = split_time(self.clock.ms(started, vision_done), [s.num_vision_patches for s in samples])
        prefill_ms = split_time(self.clock.ms(vision_done, finished), [s.num_tokens for s in samples])
        sparse_ms = split_time(sparse_total, [s.num_tokens for s in samples])
        for seq, v_ms, p_ms, s_ms, kept in zip(pack, vision_ms, prefill_ms, sparse_ms, kept_positions):
            seq.stats.vision_ms += v_ms
            seq.stats.prefill_ms += p_ms
            seq.stats.sparse_ms += s_ms
            seq.stats.kept_visual_positions = kept
            self._fill_plan_stats(seq)
        return tokens

    def _fill_plan_stats(self, seq: Sequence) -> None:
        stats, plan, sample = seq.stats, seq.plan, seq.sample
        stats.n_prompt_tokens = sample.num_tokens
        stats.n_visual_tokens = sample.num_visual_tokens
        stats.method = seq.sparsity.label
        stats.n_visual_tokens_kept = plan.final_visual
        stats.kept_per_pruning_layer = {step.layer: step.keep + step.n_clusters for step in plan.steps}
        stats.equiv_visual_tokens = plan.equivalent_visual_tokens
        stats.budget_met = plan.budget_met
        text = sample.num_tokens - sample.num_visual_tokens
        stats.prefill_flops = prefill_flops(self.adapter.text_config, text, plan.visual_per_layer)
        stats.prefill_flops_dense = prefill_flops(self.adapter.text_config, text,
                                                  (sample.num_visual_tokens,) * self.adapter.num_layers)

    def _adapt_keeps(self, pack: list[Sequence], stream: PrunedPack, layer: int, weights: torch.Tensor,
                     q: torch.Tensor, k: torch.Tensor, sparsity: SparsityConfig) -> None:
        """Rank-adaptive SparseVLM: keep floor(scale * rank(R) + bias) at this layer, at most the
        budget's count (the budget sized the KV block, so it stays an upper bound)."""
        ranks = rater_attention_ranks(stream, weights, q, k, self.adapter.attention_scale)
        for index, (seq, rank) in enumerate(zip(pack, ranks)):
            layers = [step.layer for step in seq.plan.steps]
            if layer not in layers:
                continue
            position = layers.index(layer)
            budget = [keep for _, keep in budget_schedule(sparsity, self.adapter.num_layers,
                                                          seq.sample.num_visual_tokens)]
            keeps = [step.keep for step in seq.plan.steps[:position]]
            keeps.append(min(budget[position], max(1, int(sparsity.rank_scale * rank + sparsity.rank_bias))))
            plan = plan_sample(sparsity, self.adapter.num_layers, seq.sample.num_visual_tokens,
                               keeps=keeps + budget[position + 1:])
            if any(new > old for new, old in zip(plan.visual_per_layer, seq.plan.visual_per_layer)):
                raise RuntimeError("rank-adaptive plan outgrew the KV block sized for its budget")  # cannot happen
            seq.plan = plan
            stream.replan(index, plan)

    # -- decode --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, batch: list[Sequence], queue_next: bool = True) -> list[int]:
        """One new token for every sequence of `batch` (each has its last token committed); with
        `decode_ahead` and `queue_next` (no newcomers expected before the next decode step), the
        next step of the same rows is queued before this returns."""
        started = time.perf_counter()
        tokens = self.decoder.decode(batch, queue_next)
        step_ms = 1e3 * (time.perf_counter() - started)  # reading the tokens back synchronised
        for seq in batch:
            seq.stats.decode_ms += step_ms / len(batch)
        return tokens

    def decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One decode step on device tensors -> logits (B, V). tokens, positions (B,); slots,
        starts, lengths (L, B) per layer. Graph-capturable: no host syncs."""
        hidden = self.adapter.embed_tokens(tokens)[None]  # 1, B, H
        rotary = self.adapter.rotary(hidden, self.adapter.decode_positions(positions))
        ctx = ForwardContext(self.pool, self.backend)
        for index, layer in enumerate(self.decode_layers):
            ctx.decode = DecodeMeta(slot_mapping=slots[index], starts=starts[index], lengths=lengths[index])
            hidden = self._layer(layer, hidden, rotary, ctx)
        return self.adapter.lm_head(self.adapter.norm(hidden[0]))

    @staticmethod
    def _layer(layer, hidden: torch.Tensor, rotary, ctx: ForwardContext) -> torch.Tensor:
        return layer(hidden, attention_mask=None, position_ids=None, use_cache=False,
                     position_embeddings=rotary, sparsevlm_ctx=ctx)

