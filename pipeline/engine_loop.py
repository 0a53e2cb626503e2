"""One thread drives one VLMEngine; any thread submits samples and gets futures back.

The GPU actor's Ray batches arrive concurrently (async UDF calls); each submits its samples
here and awaits them, while this loop keeps stepping the continuously batched engine: new
samples join the running set as soon as KV memory and seats allow, and finished ones are
handed back at once. The loop is the engine's only caller, so the engine stays
single-threaded. A failure of `step()` (a device fault) fails every pending future with it
and stops the loop: nothing after it could be trusted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

from sparsevlm import SamplingParams, VLMEngine
from sparsevlm.adapters import PreparedSample

logger = logging.getLogger(__name__)
_STOP = object()


class EngineLoop:
    def __init__(self, engine: VLMEngine):
        self.engine = engine
        self.fault: BaseException | None = None
        self.busy_s = 0.0  # time spent inside engine steps
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, Future] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, sample: PreparedSample, params: SamplingParams) -> Future:
        future: Future = Future()
        if self.fault is not None:
            future.set_exception(self.fault)
        else:
            self._inbox.put((sample, params, future))
        return future

    def close(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:
                # idle: block until work arrives; busy: take what has arrived and keep stepping
                items = [self._inbox.get()] if not engine.has_unfinished() else []
                while True:
                    try:
                        items.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if any(item is _STOP for item in items):
                    return
                for sample, params, future in items:
                    try:
                        self._pending[engine.add_request(sample, params)] = future
                    except Exception as error:  # a bad sample: its own error, nobody else's
                        future.set_exception(error)
                started = time.perf_counter()
                finished = engine.step()
                self.busy_s += time.perf_counter() - started
                for request_id, result in finished:
                    self._pending.pop(request_id).set_result(result)
            except BaseException as error:  # a device fault: fail everything, accept nothing more
                logger.error("engine loop stopped: %s", error)
                self.fault = error
                for future in self._pending.values():
                    future.set_exception(error)
                self._pending.clear()
                while True:
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        return
                    if item is not _STOP:
                        item[2].set_exception(error)
