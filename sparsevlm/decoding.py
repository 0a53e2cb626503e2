"""Decode steps for the model runner, each queued one step ahead of the host.

A decode step's device work (the captured graph, then sampling) takes a few milliseconds, and
the host's work between two steps (reading the tokens back, committing them, scheduling,
building the next inputs) is not much less. One step at a time, the GPU waits through all of
it. So when `Decoder.decode` hands back a step's tokens, the next step of the same sequences is
already queued behind it (`EngineConfig.decode_ahead`): its input tokens are that step's output,
still on the device, and everything else (positions, cache slots, lengths) follows from token
counts the host knows.

A queued step serves the next call if every sequence of that call's batch is one of its rows,
with the tokens it assumed: the usual case, since sequences only leave a running batch. A
sequence that will reach `max_new_tokens` with the step before is known in advance and gets a
padding row; one that stops on a stop token has a row computed for nothing (its stop is read
after the next step was queued). Nothing is queued when the scheduler expects to admit
newcomers next (`Scheduler.keeps_decoding`): a step queued then would not serve. One that does
not serve all the same (a stop freed the seats; an out-of-memory retry) is dropped: it still
runs on the GPU, but its cache writes are those a re-run writes again, and the generators of
its sampled rows are set back, so no answer depends on it.

Everything runs on one stream: a queued step's cache writes land before anything launched
after it, a prefill into a block freed meanwhile included, and it reads the captured graph's
inputs and logits only after the step before has finished with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .config import SamplingParams
from .pruning.ragged import to_device
from .sampling import select_tokens
from .scheduler import Sequence, prompt_per_layer

PADDING_PARAMS = SamplingParams()  # a padding row's token is never read: the cheapest choice


@dataclass
class DecodeStep:
    """One queued decode step: a row per sequence (None: padding), the tokens each had committed
    when it was queued, and its output on the device (with a pinned copy on its way on CUDA)."""

    rows: tuple[Sequence | None, ...]
    committed: tuple[int, ...]
    tokens: torch.Tensor
    host_tokens: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    generator_states: list[tuple[torch.Generator, torch.Tensor]] = field(default_factory=list)

    def rows_of(self, batch: list[Sequence]) -> list[int] | None:
        """The row of each sequence of `batch`, or None if this step does not serve the batch."""
        row_of = {id(seq): row for row, seq in enumerate(self.rows) if seq is not None}
        rows = [row_of.get(id(seq)) for seq in batch]
        if any(row is None or len(seq.tokens) != self.committed[row] for seq, row in zip(batch, rows)):
            return None
        return rows

    def result(self) -> list[int]:
        """The tokens, once the device has them (the one wait of a step)."""
        if self.copied is None:
            return self.tokens.tolist()
        self.copied.synchronize()
        return self.host_tokens.tolist()

    def drop(self) -> None:
        """Unused: the sampled rows' generators go back to where they were before this step."""
        for generator, state in reversed(self.generator_states):
            generator.set_state(state)


class Decoder:
    """Queues decode steps through the runner's graphs (or its eager layers) and reads them back."""

    def __init__(self, runner, ahead: bool):
        self.runner = runner
        self.ahead = ahead
        self._queued: DecodeStep | None = None
        self._columns: tuple[tuple, tuple[np.ndarray, np.ndarray] | None] = ((), None)  # live ids -> static columns

    def decode(self, batch: list[Sequence], queue_next: bool = True) -> list[int]:
        """The next token of every sequence of `batch` (each has its last token committed).
        `queue_next`: the caller expects the next step to decode these sequences again (no
        newcomers in between): only then is a step queued ahead."""
        step, self._queued = self._queued, None
        rows = None if step is None else step.rows_of(batch)
        if rows is None:
            if step is not None:
                step.drop()
            step = self._launch(tuple(batch), tuple(len(seq.tokens) for seq in batch), None)
            rows = list(range(len(batch)))
        queued = [step]
        try:
            if self.ahead and queue_next:
                queued.append(self._launch_after(step, batch))
            tokens = step.result()
        except BaseException:
            for unused in reversed(queued):
                if unused is not None:
                    unused.drop()
            raise
        self._queued = queued[-1] if len(queued) > 1 else None
        return [tokens[row] for row in rows]

    def _launch_after(self, step: DecodeStep, batch: list[Sequence]) -> DecodeStep | None:
        """The step after `step`, for its rows of `batch` that will not have reached max_new_tokens
        (the others, gone from the batch or done with this token, become padding rows)."""
        running = {id(seq) for seq in batch}
        rows = tuple(seq if id(seq) in running and not seq.last_by_length(done) else None
                     for seq, done in zip(step.rows, step.committed))
        if not any(rows):
            return None
        return self._launch(rows, tuple(done + 1 for done in step.committed), step.tokens)

    def _launch(self, rows: tuple[Sequence | None, ...], committed: tuple[int, ...],
                previous: torch.Tensor | None) -> DecodeStep:
        """Queue one step; `previous`: the device tokens it takes as input (else each row's last)."""
        runner = self.runner
        block = self.input_block(rows, committed, previous is None)
        if runner.graphs is not None and runner.graphs.fits(len(rows)):
            logits = runner.graphs.run(block, len(rows), previous)
        else:
            device_block = to_device(block, runner.device)
            if previous is not None:
                device_block[0, :len(rows)].copy_(previous)
            logits = runner.decode_logits(*runner.decode_inputs.views(device_block))
        generators = [None if seq is None else seq.generator for seq in rows]
        states = [(g, g.get_state()) for g in generators if g is not None]
        tokens = select_tokens(logits.float(), [PADDING_PARAMS if seq is None else seq.params for seq in rows],
                               generators)
        step = DecodeStep(rows, committed, tokens, generator_states=states)
        if tokens.is_cuda:
            step.host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            step.host_tokens.copy_(tokens, non_blocking=True)
            step.copied = torch.cuda.Event()
            step.copied.record()
        return step

    def input_block(self, rows: tuple[Sequence | None, ...], committed: tuple[int, ...],
                     with_tokens: bool) -> torch.Tensor:
        """The step's (2 + 3L, width) int64 inputs on the host, pinned on CUDA; `width` is the
        graphs' bucket for the rows. Fresh each step: the caching host allocator reuses a pinned
        block only once the copy out of it has run, and two steps may be on their way."""
        runner = self.runner
        layout, layers = runner.decode_inputs, runner.adapter.num_layers
        fits = runner.graphs is not None and runner.graphs.fits(len(rows))
        width = runner.graphs.bucket(len(rows)) if fits else len(rows)
        tensor = torch.empty((layout.num_rows, width), dtype=torch.long, pin_memory=runner.device.type == "cuda")
        block = tensor.numpy()
        block[:] = np.asarray(layout.padding(runner.pool.spare_slot))[:, None]
        live = [row for row, seq in enumerate(rows) if seq is not None]
        seqs = [rows[row] for row in live]
        starts, prompts = self._static_columns(seqs)
        generated = np.array([committed[row] for row in live], dtype=np.int64)
        lengths = prompts + generated[None, :]  # the new token included
        block[0, live] = [seq.tokens[-1] for seq in seqs] if with_tokens else 0
        block[1, live] = [seq.sample.next_position for seq in seqs] + generated - 1
        block[2:2 + layers, live] = starts + lengths - 1
        block[2 + layers:2 + 2 * layers, live] = starts
        block[2 + 2 * layers:, live] = lengths
        return tensor

    def _static_columns(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """(L, B) first slots and prompt lengths per layer: they change only with membership (a
        sequence retried after an out-of-memory comes back with another block)."""
        members = tuple((seq.request_id, seq.block.start) for seq in seqs)
        if members != self._columns[0]:
            starts = np.array([seq.block.layer_starts for seq in seqs], dtype=np.int64).T
            prompts = np.array([prompt_per_layer(seq.sample, seq.plan) for seq in seqs], dtype=np.int64).T
            self._columns = (members, (starts, prompts))
        return self._columns[1]
