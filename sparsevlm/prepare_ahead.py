"""Samples prepared in order, on a worker thread, while the device runs the packs before them.

`VLMEngine.generate` takes processor outputs; each needs host work before it can be queued
(checks, M-RoPE positions with transformers' own code, pixels copied to pinned memory): ~1 ms
a sample, which the device would otherwise wait out before every run. On a worker thread that
work overlaps the device running the packs already queued (the engine's thread waits in
CUDA syncs, which release the GIL). Inline, every sample is prepared before anything runs.

`next(wait)` hands them out in order: the prepared sample, or None when none is ready yet and
`wait` is False. On the worker, a sample that fails its checks raises from `next` in its turn
(and nothing after it is prepared); inline, from the constructor.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from .adapters import PreparedSample

Prepare = Callable[[dict, int], PreparedSample]


class PrepareAhead:
    def __init__(self, prepare: Prepare, samples: list[dict], threaded: bool):
        self.total = len(samples)
        self.handed = 0
        self._stop = threading.Event()
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, args=(prepare, samples), daemon=True,
                                            name="sparsevlm-prepare")
            self._thread.start()
        else:
            for index, sample in enumerate(samples):  # a bad sample raises here, before anything runs
                self._ready.put((prepare(sample, index), None))

    @property
    def exhausted(self) -> bool:
        return self.handed == self.total

    def _run(self, prepare: Prepare, samples: list[dict]) -> None:
        for index, sample in enumerate(samples):
            if self._stop.is_set():
                return
            try:
                self._ready.put((prepare(sample, index), None))
            except BaseException as error:  # noqa: BLE001 - handed to the engine's thread, raised there in order
                self._ready.put((None, error))
                return

    def next(self, wait: bool) -> PreparedSample | None:
        if self.exhausted:
            raise RuntimeError("every sample was handed out")
        try:
            prepared, error = self._ready.get(block=wait)
        except queue.Empty:
            return None
        if error is not None:
            self.handed = self.total  # nothing after a bad sample is handed out
            raise error
        self.handed += 1
        return prepared

    def close(self) -> None:
        """Stop preparing (an error or an interrupt on the engine's thread) and let the worker end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
