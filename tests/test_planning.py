"""Host-side planning and sampling helpers against plain reference code."""

from __future__ import annotations

import random

import pytest
import torch

from sparsevlm.adapters.base import PreparedSample
from sparsevlm.config import SamplingParams, SparsityConfig
from sparsevlm.kv_cache import FreeList, KVPool
from sparsevlm.pruning.schedule import plan_sample
from sparsevlm.scheduler import Scheduler, Sequence
from sparsevlm.sampling import filter_logits


@pytest.mark.parametrize("seed", range(20))
def test_free_list_against_a_slot_map(seed):
    """First fit with coalescing, checked against a plain per-slot occupancy list."""
    rng = random.Random(seed)
    size = rng.randint(1, 200)
    free_list, occupied, live = FreeList(size), [False] * size, []
    for _ in range(300):
        if live and rng.random() < 0.45:
            start, length = live.pop(rng.randrange(len(live)))
            free_list.release(start, length)
            occupied[start:start + length] = [False] * length
        else:
            length = rng.randint(1, 30)
            start = free_list.allocate(length)
            first_fit = next((i for i in range(size - length + 1) if not any(occupied[i:i + length])), None)
            assert start == first_fit
            if start is not None:
                occupied[start:start + length] = [True] * length
                live.append((start, length))
        assert free_list.num_free == occupied.count(False)
    twice = FreeList(10)
    twice.release(twice.allocate(4), 4)
    with pytest.raises(RuntimeError, match="released twice"):
        twice.release(0, 4)


def test_pool_blocks_are_laid_out_layer_by_layer():
    pool = KVPool(100, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    first = pool.allocate([5, 3, 3])
    second = pool.allocate([10, 10, 10])
    assert first.layer_starts == (0, 5, 8) and second.layer_starts == (11, 21, 31)
    assert pool.allocate([50, 50]) is None and pool.num_free == 100 - 41
    pool.release(first)
    assert pool.allocate([4, 4, 3]).layer_starts == (0, 4, 8)  # the freed run is reused first
    assert pool.spare_slot == 100 and pool.pool.shape[1] == 101  # padded decode rows write past every block


def _sequence(request_id: int, prompt: int, max_new: int = 4, sparsity=None) -> Sequence:
    sample = PreparedSample(index=request_id, input_ids=torch.zeros(prompt, dtype=torch.long),
                            positions=torch.zeros(3, prompt, dtype=torch.long), next_position=prompt)
    sparsity = sparsity or SparsityConfig()
    return Sequence(request_id, sample, SamplingParams(max_new_tokens=max_new), sparsity,
                    plan_sample(sparsity, 2, 0), frozenset(), seed=request_id)


@pytest.mark.parametrize("seed", range(10))
def test_scheduler_admits_within_limits_and_frees_on_finish(seed):
    """A random stream of arrivals and finishes: limits always hold, nobody waits forever, FIFO admission."""
    rng = random.Random(seed)
    max_seqs, max_tokens, layers = rng.randint(1, 5), rng.randint(10, 60), 2
    pool = KVPool(rng.randint(40, 200), 1, 2, torch.float32, torch.device("cpu"))
    scheduler = Scheduler(pool, max_seqs, max_tokens)
    arrivals = [_sequence(i, rng.randint(1, 15), rng.randint(1, 5)) for i in range(40)]
    admitted_order, finished = [], 0
    while arrivals or scheduler.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if arrivals:
                scheduler.add(arrivals.pop(0))
        step = scheduler.schedule()
        if step is None:
            continue
        assert step.kind in ("prefill", "decode")
        assert len(scheduler.running) <= max_seqs
        assert pool.num_free == pool.capacity - sum(s.block.num_slots for s in scheduler.running)
        if step.kind == "prefill":
            assert len(step.sequences) == 1 or sum(s.sample.num_tokens for s in step.sequences) <= max_tokens
            admitted_order += [s.request_id for s in step.sequences]
        for seq in step.sequences:
            seq.commit(7)
        finished += len(scheduler.finish_step(step))
    assert admitted_order == list(range(40)) and finished == 40 and pool.num_free == pool.capacity


def test_scheduler_rejects_what_can_never_fit_and_retries_smaller_after_oom():
    pool = KVPool(30, 1, 2, torch.float32, torch.device("cpu"))
    scheduler = Scheduler(pool, max_num_seqs=8, max_prefill_tokens=100)
    for i, prompt in enumerate([40, 2, 2, 2, 2]):  # the first needs 2 * (40 + 4) slots
        scheduler.add(_sequence(i, prompt))
    step = scheduler.schedule()
    assert step.kind == "reject" and step.sequences[0].request_id == 0
    step = scheduler.schedule()
    assert step.kind == "prefill" and [s.request_id for s in step.sequences] == [1, 2]  # 12 slots each
    scheduler.retry_smaller(step.sequences)
    assert pool.num_free == 30 and [s.request_id for s in scheduler.waiting] == [1, 2, 3, 4]
    step = scheduler.schedule()
    assert [s.request_id for s in step.sequences] == [1]  # half as many per pack until one succeeds
    scheduler.finish_step(step)
    assert [s.request_id for s in scheduler.schedule().sequences] == [2]  # room for one more only


def naive_filter(logits, temperature, top_k, top_p):
    logits = logits / temperature
    keep = set(range(len(logits)))
    order = sorted(range(len(logits)), key=lambda i: -logits[i].item())
    if top_k:
        keep &= set(order[:top_k])
    if top_p < 1:
        probs = torch.softmax(logits, -1)
        chosen, mass = set(), 0.0
        for i in order:
            chosen.add(i)
            mass += probs[i].item()
            if mass >= top_p:
                break
        keep &= chosen
    return torch.tensor([logits[i].item() if i in keep else float("-inf") for i in range(len(logits))])


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (10, 0.5), (3, 0.99)])
def test_filter_logits_matches_naive(top_k, top_p):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(top_k))
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    torch.testing.assert_close(filter_logits(logits, params), naive_filter(logits, 0.7, top_k, top_p))
