"""The test side of `server/runtime/gate.py`: hold a model's runs, see them arrive, release them.

A model exported with `gate_config(directory)` in its config runs only when the test lets it,
so "the instance is busy" lasts exactly as long as a test needs, on a machine of any speed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Generous: only reached when something is broken, never part of a passing run's timing.
WAIT_S = 60.0


def gate_config(directory: Path) -> str:
    """The config.pbtxt lines that put a model's instances behind the gate in `directory`."""
    return f'parameters {{ key: "test_gate_dir" value: {{ string_value: "{directory}" }} }}'


class Gate:
    """Drives the gate directory of one model (or several sharing it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.open()

    def open(self) -> None:
        """Every run, waiting or future, goes through."""
        (self.directory / "open").touch()

    def close(self) -> None:
        """Runs that start from now on wait for `release`."""
        (self.directory / "open").unlink(missing_ok=True)

    def entered(self) -> list[str]:
        """Ids of every run that has reached the gate so far, oldest first."""
        names = [p.name.removeprefix("entered.") for p in self.directory.glob("entered.*")]
        # Oldest first by the marker's mtime; the run's counter breaks ties within one mtime tick.
        def age(run: str) -> tuple[int, int]:
            return (self.directory / f"entered.{run}").stat().st_mtime_ns, int(run.split(".")[-1])

        return sorted(names, key=age)

    def rows(self, run: str) -> int:
        """How many batch rows run `run` holds."""
        return int(json.loads((self.directory / f"entered.{run}").read_text())["rows"])

    def wait_entered(self, seen: int, timeout_s: float = WAIT_S) -> str:
        """Waits until more than `seen` runs have reached the gate; returns the id of run number `seen` + 1.

        Count `seen` before starting whatever makes the run: the run may reach the gate at once.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            runs = self.entered()
            if len(runs) > seen:
                return runs[seen]
            if time.monotonic() > deadline:
                raise AssertionError(f"no run reached the gate in {timeout_s} s ({len(runs)} so far)")
            time.sleep(0.002)

    def release(self, run: str) -> None:
        (self.directory / f"release.{run}").touch()

    @contextmanager
    def held(self) -> Iterator[Gate]:
        """Closed inside the block; open again afterwards, whatever happens, so nothing is left waiting."""
        self.close()
        try:
            yield self
        finally:
            self.open()


def wait_until(predicate, what: str, timeout_s: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    """Polls `predicate()` until it is true; fails with `what` after a generous timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)
