"""A model instance's own thread, and running one batch on an instance.

The scheduler (batcher.py) hands each batch to an instance's thread, or, for short runs under load, runs it
on the event loop itself (see Scheduler._run_on_loop); both run it through run_instance.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from server.core.errors import ModelRunError, ServerError, first_line
from server.runtime.base import Runtime

logger = logging.getLogger(__name__)

# Called on the event loop when a run ends: (results, inference ns, error); results is None on error.
RunDone = Callable[[list[np.ndarray] | None, int, BaseException | None], None]
# One batch for an instance's thread: the loop to answer on, the feed, the outputs wanted, the callback.
_Job = tuple[asyncio.AbstractEventLoop, dict[str, np.ndarray], Sequence[str], RunDone]


class InstanceThread:
    """One model instance and the thread that runs its batches.

    A dedicated thread fed through a SimpleQueue, answering with call_soon_threadsafe,
    costs fewer wake-ups and less Python than an executor future chained to an
    asyncio future, which matters when a run itself takes a fraction of a millisecond.
    """

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, loop: asyncio.AbstractEventLoop, feed: dict[str, np.ndarray], names: Sequence[str], done: RunDone
    ) -> None:
        """Runs the batch on this instance's thread; `done(results, infer_ns, error)` is called on the loop."""
        self._jobs.put((loop, feed, names, done))

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, feed, names, done = job
            try:
                results, infer_ns = run_instance(self.runtime, feed, names)
            except Exception as exc:  # every failure is handed to the requests of the batch
                loop.call_soon_threadsafe(done, None, 0, exc)
            else:
                loop.call_soon_threadsafe(done, results, infer_ns, None)

    def stop(self) -> None:
        """Lets the thread finish its current batch and end."""
        self._jobs.put(None)
        self._thread.join(timeout=60)


def run_instance(instance: Runtime, feed: dict[str, np.ndarray], names: Sequence[str]) -> tuple[list[np.ndarray], int]:
    """Runs one batch on an instance (on its thread, or on the loop) and times it."""
    start = time.perf_counter_ns()
    try:
        results = instance.run(feed, names)
    except ServerError:
        raise
    except Exception as exc:
        # ONNX Runtime's own messages can be long and name internal paths: log, keep it short.
        logger.exception("model run failed")
        raise ModelRunError(first_line(exc, empty="model run failed")) from exc
    return results, time.perf_counter_ns() - start
