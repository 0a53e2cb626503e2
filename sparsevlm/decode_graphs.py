"""CUDA graphs of one decode step, one per batch-size bucket.

A decode step is ~10 small kernels per layer; at decode batch sizes the GPU finishes them
faster than Python can launch them, so we replay captured graphs. A batch of B samples
runs in the smallest bucket >= B; padding rows attend to nothing (length 0) and write
their K/V to the cache's spare slot. Graphs bake in the cache pool's address, so they are
keyed by it; the engine reuses one pool across batches when it is large enough.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], logits: torch.Tensor):
        self.graph, self.inputs, self.logits = graph, inputs, logits


class DecodeGraphs:
    def __init__(self, engine):
        self.engine = engine
        self.buckets = sorted(engine.config.graph_batch_buckets)
        self._graphs: dict[tuple[int, int], _Graph] = {}

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def run(self, cache, tokens, positions, slots, starts, lengths) -> torch.Tensor:
        """Host tensors in (tokens, positions (B,); slots, starts, lengths (L, B)), device logits (B, V) out."""
        batch = tokens.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        key = (bucket, cache.pool.data_ptr())
        if key not in self._graphs:
            if len(self._graphs) and all(k[1] != key[1] for k in self._graphs):
                self._graphs.clear()  # a new pool: graphs of the old one are dead
            self._graphs[key] = self._capture(cache, bucket)
        graph = self._graphs[key]
        pad = bucket - batch
        host = {
            "tokens": tokens, "positions": positions, "slots": slots, "starts": starts, "lengths": lengths,
        }
        fill = {"tokens": 0, "positions": 0, "slots": cache.spare_slot, "starts": cache.spare_slot, "lengths": 0}
        for name, value in host.items():
            if pad:
                value = torch.cat([value, torch.full((*value.shape[:-1], pad), fill[name], dtype=value.dtype)], dim=-1)
            graph.inputs[name].copy_(value.pin_memory(), non_blocking=True)
        graph.graph.replay()
        return graph.logits[:batch]

    def _capture(self, cache, bucket: int) -> _Graph:
        device = self.engine.device
        layers = self.engine.adapter.num_layers
        inputs = {
            "tokens": torch.zeros(bucket, dtype=torch.long, device=device),
            "positions": torch.zeros(bucket, dtype=torch.long, device=device),
            "slots": torch.full((layers, bucket), cache.spare_slot, dtype=torch.long, device=device),
            "starts": torch.full((layers, bucket), cache.spare_slot, dtype=torch.int32, device=device),
            "lengths": torch.zeros(layers, bucket, dtype=torch.int32, device=device),
        }
        args = (cache, inputs["tokens"], inputs["positions"], inputs["slots"], inputs["starts"], inputs["lengths"])
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton autotune/compile and allocator state outside capture
                self.engine.decode_logits(*args)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.engine.decode_logits(*args)
        logger.info("captured decode graph for batch bucket %d", bucket)
        return _Graph(graph, inputs, logits)
