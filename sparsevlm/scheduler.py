"""Who runs next: a waiting queue, a running set, and the KV blocks they hold. No tensors.

Every engine step asks `schedule()` for work. Newcomers are admitted in arrival order while
`max_num_seqs`, the prefill token budget and the KV pool allow, and prefilled together (one
pack); when nobody can be admitted, every running sequence decodes one token. While others
decode, newcomers wait until a quarter of the seats is free (or the queue is that short): a
pack of one or two samples pays the vision tower's and the pruning's fixed costs for little,
and stalls everybody's decoding each time (measured on the H200: prefilling whenever one
seat freed made a ragged mix slower than static batches). A sequence
reserves its KV block for its whole life (prompt as each layer keeps it, plus
`max_new_tokens`) when it is admitted, so decoding never runs out of memory and nothing is
ever preempted for room; a finished sequence gives its block back at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .adapters.base import PreparedSample
from .config import SamplingParams, SparsityConfig
from .kv_cache import KVBlock, KVPool
from .pruning.schedule import SamplePlan
from .stats import SampleStats


@dataclass
class Sequence:
    """One request from admission to its last token."""

    request_id: int
    sample: PreparedSample
    params: SamplingParams
    sparsity: SparsityConfig
    plan: SamplePlan  # rank-adaptive plans are final only after prefill (never larger than this one)
    stop_ids: frozenset[int]
    seed: int  # fallback seed of sampled decoding (SamplingParams.seed wins)
    block: KVBlock | None = None
    tokens: list[int] = field(default_factory=list)
    stats: SampleStats = field(default_factory=SampleStats)
    generator: Any = None  # torch.Generator of sampled decoding, made at prefill
    error: Exception | None = None
    solo: bool = False  # prefill alone: a pack it was in failed, and the culprit must be found

    @property
    def done(self) -> bool:
        return bool(self.stats.finish_reason) or self.error is not None

    @property
    def layer_capacities(self) -> tuple[int, ...]:
        """Cache slots at each layer: what the layer sees of the prompt, plus the new tokens."""
        return prompt_per_layer(self.sample, self.plan, self.params.max_new_tokens)

    def last_by_length(self, committed: int) -> bool:
        """Whether the token after `committed` ones is its last by `max_new_tokens`."""
        return committed + 1 >= self.params.max_new_tokens

    def commit(self, token: int) -> None:
        self.tokens.append(token)
        self.stats.n_generated_tokens = len(self.tokens)
        if token in self.stop_ids:
            self.stats.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.stats.finish_reason = "length"

    def reset(self) -> None:
        """Back to waiting, as if never started (an out-of-memory retry); the answer is recomputed."""
        self.block, self.tokens, self.stats, self.generator = None, [], SampleStats(), None


def prompt_per_layer(sample: PreparedSample, plan: SamplePlan, extra: int = 0) -> tuple[int, ...]:
    """Tokens each layer caches of the prompt (visual ones as the plan keeps them), plus `extra`."""
    text = sample.num_tokens - sample.num_visual_tokens
    return tuple(text + visual + extra for visual in plan.visual_per_layer)


@dataclass
class ScheduledStep:
    kind: str  # "prefill", "decode" or "reject" (can never fit the pool)
    sequences: list[Sequence]


class Scheduler:
    def __init__(self, pool: KVPool, max_num_seqs: int, max_prefill_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pack_limit: int | None = None  # after an out-of-memory prefill: at most this many per pack

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        if self.waiting:
            head = self.waiting[0]
            if sum(head.layer_capacities) > self.pool.capacity:
                self.waiting.popleft()
                return ScheduledStep("reject", [head])
            admitted = self._admit() if self._seats_for_a_pack(len(self.running)) else []
            if admitted:
                return ScheduledStep("prefill", admitted)
        if self.running:
            return ScheduledStep("decode", list(self.running))
        return None

    def waiting_fills_a_pack(self) -> bool:
        """Whether the queue already holds all a pack can take (its seats, or more prefill tokens than
        a pack's budget), so a caller still adding requests need not wait for more before the next
        step: the next pack is the same either way."""
        tokens = 0
        for count, sequence in enumerate(self.waiting, start=1):
            tokens += sequence.sample.num_tokens
            if count >= self.max_num_seqs or tokens > self.max_prefill_tokens:
                return True
        return False

    def _seats_for_a_pack(self, running: int) -> bool:
        """Whether newcomers are let in beside `running` sequences (if the KV pool has room)."""
        worth_a_pack = min(len(self.waiting), max(1, self.max_num_seqs // 4))
        return not running or self.max_num_seqs - running >= worth_a_pack

    def keeps_decoding(self, batch: list[Sequence]) -> bool:
        """Whether the step after this decode step of `batch` will likely decode the same sequences
        (no pack admitted in between), counting those that reach max_new_tokens with it as gone.
        A stop token can still free the seats: the prediction only saves a queued step's waste."""
        if not self.waiting:
            return True
        leaving = sum(seq.last_by_length(len(seq.tokens)) for seq in batch)
        return not self._seats_for_a_pack(len(self.running) - leaving)

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        tokens = 0
        limit = self._pack_limit or self.max_num_seqs
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs and len(admitted) < limit:
            sequence = self.waiting[0]
            if admitted and (sequence.sparsity != admitted[0].sparsity or sequence.solo or admitted[0].solo
                             or tokens + sequence.sample.num_tokens > self.max_prefill_tokens):
                break
            block = self.pool.allocate(sequence.layer_capacities)
            if block is None:
                break
            sequence.block = block
            self.waiting.popleft()
            admitted.append(sequence)
            tokens += sequence.sample.num_tokens
        if admitted:
            self.running.extend(admitted)
        return admitted

    def finish_step(self, step: ScheduledStep) -> list[Sequence]:
        """After a step committed its tokens: the finished ones leave and give their blocks back."""
        if step.kind == "prefill":
            self._pack_limit = None  # a pack went through (at the smaller size after an out-of-memory)
        finished = [s for s in step.sequences if s.done]
        if finished:
            gone = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in gone]
            for sequence in finished:
                self._release(sequence)
        return finished

    def retry_smaller(self, sequences: list[Sequence]) -> None:
        """A step ran out of memory: its sequences start over, in their order, ahead of the queue,
        and prefill packs hold at most half as many until one succeeds."""
        gone = {id(s) for s in sequences}
        self.running = [s for s in self.running if id(s) not in gone]
        for sequence in reversed(sequences):
            self._release(sequence)
            sequence.reset()
            self.waiting.appendleft(sequence)
        self._pack_limit = max(1, len(sequences) // 2)

    def retry_alone(self, sequences: list[Sequence]) -> None:
        """A pack failed: each of its sequences is prefilled alone, so only the culprit fails."""
        self.retry_smaller(sequences)
        self._pack_limit = None
        for sequence in sequences:
            sequence.solo = True

    def _release(self, sequence: Sequence) -> None:
        if sequence.block is not None:
            self.pool.release(sequence.block)
            sequence.block = None
