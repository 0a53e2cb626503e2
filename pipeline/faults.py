"""What the GPU stage does when the device breaks, and the ledger that stops endless retries.

A sticky device error (illegal address, ECC, a lost device) leaves the CUDA context unusable:
every later call on that process fails too. Turning it into error rows would fail every row
that actor sees from then on, so the actor exits instead (`os._exit`, as Ray Data LLM does:
a system failure, which Ray answers by restarting the actor and retrying its tasks on it).
The ledger, one small actor per job, counts the device faults each id was in the engine
for: before exiting, the actor blames every row then in its engine. On the retry, a blamed
row is a suspect and runs alone, with the engine otherwise idle (`SharedExclusive`), so a
second fault blames it alone and an innocent batch mate goes through. A row blamed twice
gets an error row instead of another try: a row that breaks the device every time cannot
stall the job, nor take its neighbours down with it.

For tests, `SPARSEVLM_INJECT_DEVICE_FAULT="<id>:<times>:<folder>"` makes a GPU actor fail as
a device fault would, the first <times> times it is given <id> (counted by files in <folder>,
which outlive the actor); run_job forwards the variable to the GPU actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import uuid
from pathlib import Path

from sparsevlm.engine import DeviceFault

logger = logging.getLogger(__name__)
MAX_FAULTS = 2  # a row blamed this often gets an error row
INJECT_ENV = "SPARSEVLM_INJECT_DEVICE_FAULT"


class FaultLedger:
    """Ray actor: device faults per id, across GPU actor restarts."""

    def __init__(self):
        self._faults: dict = {}

    def blame(self, ids: list) -> None:
        for row_id in ids:
            self._faults[row_id] = self._faults.get(row_id, 0) + 1

    def faults(self, ids: list) -> list[int]:
        return [self._faults.get(row_id, 0) for row_id in ids]


def exhausted_error(faults: int) -> str:
    return (f"predict: device fault on {faults} attempts (the GPU actor was restarted each time; the last "
            "time this row ran alone): this row breaks the device")


class SharedExclusive:
    """asyncio: many batches share the engine; a suspect takes it alone once they have drained.
    A waiting suspect holds new batches back, so it is never starved."""

    def __init__(self):
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self):
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self):
        async with self._cond:
            self._waiting += 1
            await self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def exit_for_restart(error: BaseException, ledger=None, in_engine: list | None = None) -> None:
    """Blame the rows in the engine, then leave the process so Ray restarts the actor with a fresh
    CUDA context and retries its rows."""
    logger.error("device fault, exiting so Ray restarts this GPU actor: %s", error)
    if ledger is not None and in_engine:
        import ray

        try:
            ray.get(ledger.blame.remote(in_engine), timeout=30)
        except Exception as unreachable:  # the restart matters more than the blame
            logger.error("could not record the fault in the ledger: %s", unreachable)
    print(f"sparsevlm GPU actor: device fault, exiting for a restart: {error}", file=sys.stderr, flush=True)
    os._exit(1)


def maybe_inject(ids: list) -> None:
    """Fail like a device fault when the test hook names one of `ids` (see the module docstring)."""
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return
    target, times, folder = spec.split(":", 2)
    if target not in {str(i) for i in ids}:
        return
    marks = Path(folder)
    marks.mkdir(parents=True, exist_ok=True)
    if len(list(marks.iterdir())) < int(times):
        (marks / uuid.uuid4().hex).touch()
        raise DeviceFault(f"CUDA error: an illegal memory access was encountered (injected for id {target})")
