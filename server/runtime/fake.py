"""A deterministic in-memory runtime for scheduler tests: y = 2 * x, with a log of every run."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from server.runtime.base import GraphTensor, Runtime


class FakeRuntime(Runtime):
    """Doubles input `x` into output `y`; records each run's input; can be slowed or made to fail.

    Args:
        delay_s: Time each run takes (sleeps, as a real run blocks a thread).
        fail_if: Runs whose input satisfies this raise RuntimeError.
    """

    def __init__(self, delay_s: float = 0.0, fail_if: object = None) -> None:
        self.delay_s = delay_s
        self.fail_if = fail_if
        self.runs: list[np.ndarray] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    @property
    def inputs(self) -> Sequence[GraphTensor]:
        return [GraphTensor("x", "FP32", "tensor(float)", (-1, -1))]

    @property
    def outputs(self) -> Sequence[GraphTensor]:
        return [GraphTensor("y", "FP32", "tensor(float)", (-1, -1))]

    @property
    def providers(self) -> Sequence[str]:
        return ["FakeExecutionProvider"]

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        x = np.array(inputs["x"])
        with self._lock:
            self.runs.append(x)
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if callable(self.fail_if) and self.fail_if(x):
                raise RuntimeError("fake failure for this batch")
            return [x * 2 for _ in output_names]
        finally:
            with self._lock:
                self.concurrent -= 1
