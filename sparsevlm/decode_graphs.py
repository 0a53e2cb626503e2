"""CUDA graphs of one decode step, one per batch-size bucket, captured once at start-up.

A decode step is ~10 small kernels per layer; at decode batch sizes the GPU finishes them
faster than Python can launch them, so we replay captured graphs. A batch of B samples
runs in the smallest bucket >= B; padding rows attend to nothing (length 0) and write
their K/V to the pool's spare slot. The KV pool lives as long as the engine, so graphs
captured against it stay valid. A step's inputs arrive as one int64 block (see
`DecodeInputs`), copied in one transfer.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class DecodeInputs:
    """Rows of one decode step's int64 input block (2 + 3L, B): tokens, positions, then per
    layer the new token's slot, the sample's first slot and its cached length."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.num_rows = 2 + 3 * num_layers

    def padding(self, spare_slot: int) -> list[int]:
        """Column of a padded row: token 0 at position 0 writing to the spare slot, length 0."""
        layers = self.num_layers
        return [0, 0] + [spare_slot] * (2 * layers) + [0] * layers

    def views(self, block: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(tokens, positions (B,), slots (L, B) long, starts, lengths (L, B) int32) of a device block."""
        layers = self.num_layers
        return (block[0], block[1], block[2:2 + layers], block[2 + layers:2 + 2 * layers].int(),
                block[2 + 2 * layers:].int())


class DecodeGraphs:
    def __init__(self, runner, buckets: list[int]):
        self.runner = runner
        self.buckets = sorted(buckets)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def bucket(self, batch_size: int) -> int:
        return next(b for b in self.buckets if b >= batch_size)

    @torch.inference_mode()  # as decode steps run: compiled layers are traced for inference, saving nothing
    def capture_all(self) -> None:
        for bucket in self.buckets:
            self._graphs[bucket] = self._capture(bucket)
        logger.info("captured decode graphs for batch buckets %s", self.buckets)

    def run(self, host_block: torch.Tensor, batch_size: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """`host_block` (rows, bucket) int64, pinned, padded to a bucket -> device logits (B, V).
        `tokens`: the first row's B input tokens from the device instead (a step queued ahead)."""
        graph, inputs, logits = self._graphs[host_block.shape[1]]
        inputs.copy_(host_block, non_blocking=True)
        if tokens is not None:
            inputs[0, :batch_size].copy_(tokens)
        graph.replay()
        return logits[:batch_size]

    def _capture(self, bucket: int):
        runner = self.runner
        device = runner.device
        layout = runner.decode_inputs
        column = torch.tensor(layout.padding(runner.pool.spare_slot), dtype=torch.long)
        inputs = column[:, None].expand(-1, bucket).contiguous().to(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton autotune/compile and allocator state outside capture
                runner.decode_logits(*layout.views(inputs))
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = runner.decode_logits(*layout.views(inputs))
        return graph, inputs, logits
