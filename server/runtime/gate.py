"""A runtime wrapper that holds each run until a test releases it (test suites only).

Tests that need "an instance is busy" (a full queue, a request expiring in the queue,
a cancel while queued, shutdown with work in flight) cannot rely on a model being slow
enough: on a fast machine it is not. With this wrapper the test decides when a run ends,
so the state it needs lasts exactly as long as it wants, on any machine.

It is enabled only when the server runs with ORTSERVE_TEST_GATES=1 and a model's config
has the parameter `test_gate_dir` (a directory). Every run of a wrapped instance then:

1. writes `entered.<pid>.<n>` into the directory (n counts this process's runs from 1;
   the file holds the run's row count as JSON, e.g. {"rows": 256}), then
2. waits until `release.<pid>.<n>` or `open` exists there, then runs the real model.

The files are the whole protocol, so a test process drives a server process without any
extra channel. Closing the instance lets waiting runs through, so an unload or shutdown
never hangs on a gate nobody releases.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from server.core.errors import ModelLoadError
from server.runtime.base import Runtime

ENABLE_ENV = "ORTSERVE_TEST_GATES"
GATE_PARAMETER = "test_gate_dir"
_POLL_S = 0.002


def gate_dir_from(parameters: Mapping[str, str]) -> Path | None:
    """The gate directory a model config asks for, or None.

    Raises:
        ModelLoadError: the parameter is set but gates are not enabled, or it is not a directory.
    """
    value = parameters.get(GATE_PARAMETER)
    if value is None:
        return None
    if os.environ.get(ENABLE_ENV) != "1":
        raise ModelLoadError(f"parameter '{GATE_PARAMETER}' is for ortserve's test suite only ({ENABLE_ENV}=1)")
    path = Path(value)
    if not path.is_dir():
        raise ModelLoadError(f"parameter '{GATE_PARAMETER}' is not a directory: {value[:200]!r}")
    return path


class _Counter:
    """Run numbers per gate directory, shared by every instance in this process."""

    _lock = threading.Lock()
    _counters: dict[Path, itertools.count[int]] = {}

    @classmethod
    def next(cls, directory: Path) -> int:
        with cls._lock:
            counter = cls._counters.setdefault(directory.resolve(), itertools.count(1))
            return next(counter)


class GatedRuntime(Runtime):
    """Wraps `inner`; each run waits at the gate in `directory` (see the module docstring)."""

    def __init__(self, inner: Runtime, directory: Path) -> None:
        self.inner = inner
        self.inputs, self.outputs, self.providers = inner.inputs, inner.outputs, inner.providers
        self.may_run_on_loop = False  # a run waits at the gate for as long as the test says
        self.directory = directory
        self._closed = threading.Event()

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        run_id = f"{os.getpid()}.{_Counter.next(self.directory)}"
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 0
        # Written under a temporary name, then renamed: a test that sees the file can read it whole.
        staging = self.directory / f".entered.{run_id}.tmp"
        staging.write_text(json.dumps({"rows": rows}))
        os.replace(staging, self.directory / f"entered.{run_id}")
        release, always = self.directory / f"release.{run_id}", self.directory / "open"
        while not (always.exists() or release.exists()):
            if self._closed.wait(_POLL_S):
                break
        return self.inner.run(inputs, output_names)

    def close(self) -> None:
        self._closed.set()
        self.inner.close()


def wrap(instances: Sequence[Runtime], directory: Path | None) -> list[Runtime]:
    """The instances, each behind the gate when a directory is given."""
    if directory is None:
        return list(instances)
    return [GatedRuntime(instance, directory) for instance in instances]
