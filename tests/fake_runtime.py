"""A deterministic in-memory runtime for the scheduler's unit tests: y = 2 * x, with a log of every run.

Test-only (tests/unit/test_batcher.py), so it lives with the tests rather than in the served package.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from server.runtime.base import GraphTensor, Runtime


class FakeRuntime(Runtime):
    """Doubles input `x` into output `y`; records each run's input; can be held or made to fail.

    Args:
        held: Every run waits (its input already recorded in `runs`) until `release()`:
            the test, not the machine's speed, decides how long an instance stays busy.
        fail_if: Runs whose input satisfies this raise RuntimeError.
        may_run_on_loop: What the runtime tells the scheduler (Runtime.may_run_on_loop).
    """

    def __init__(self, held: bool = False, fail_if: object = None, may_run_on_loop: bool = False) -> None:
        self.fail_if = fail_if
        self.may_run_on_loop = may_run_on_loop
        self.runs: list[np.ndarray] = []
        self.threads: list[int] = []  # the thread of each run, in the order of `runs`
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()
        self._open = threading.Event()
        if not held:
            self._open.set()
        self.inputs = [GraphTensor("x", "FP32", "tensor(float)", (-1, -1))]
        self.outputs = [GraphTensor("y", "FP32", "tensor(float)", (-1, -1))]
        self.providers = ["FakeExecutionProvider"]

    def release(self) -> None:
        """Lets every waiting and future run through."""
        self._open.set()

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        x = np.array(inputs["x"])
        with self._lock:
            self.runs.append(x)
            self.threads.append(threading.get_ident())
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            self._open.wait()
            if callable(self.fail_if) and self.fail_if(x):
                raise RuntimeError("fake failure for this batch")
            return [x * 2 for _ in output_names]
        finally:
            with self._lock:
                self.concurrent -= 1
