"""Batches on the event loop (Scheduler._on_loop): under load, a single instance with short runs that allows it
runs its batches on the loop thread, gathered when the run starts; everything else stays on the instance thread.

What decides it is state the tests set: the runtime's flag, the instance count, the run-time limit (patched, so a
slow machine's runs cannot change the outcome), and the company a burst of concurrent requests makes.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from server.core import batcher
from server.core.batcher import Scheduler, SchedulerConfig
from server.core.errors import ModelRunError
from server.core.statistics import ModelStats
from server.runtime import cpus
from tests.fake_runtime import FakeRuntime

BATCHING = SchedulerConfig(max_batch_size=8, dynamic_batching=True)


@pytest.fixture(autouse=True)
def any_run_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """However long the fake's runs take on this machine, they count as short."""
    monkeypatch.setattr(batcher, "LOOP_RUN_LIMIT_NS", 10**12)


async def one(scheduler: Scheduler, value: float) -> np.ndarray:
    [y] = await scheduler.submit({"x": np.full((1, 3), value, np.float32)}, 1, ["y"])
    return y


async def burst(scheduler: Scheduler, count: int, first: float = 0.0) -> list[np.ndarray]:
    """`count` requests submitted together: every one after the first finds the others outstanding."""
    return list(await asyncio.gather(*(one(scheduler, first + i) for i in range(count))))


def check(results: list[np.ndarray], first: float = 0.0) -> None:
    for i, y in enumerate(results):
        np.testing.assert_array_equal(y, np.full((1, 3), 2.0 * (first + i), np.float32))


async def test_under_load_batches_run_on_the_loop_gathered_when_they_start() -> None:
    runtime = FakeRuntime(may_run_on_loop=True)
    scheduler = Scheduler("fake", [runtime], BATCHING, ModelStats())
    loop_thread = threading.get_ident()
    check([await one(scheduler, 0.0)])  # no run measured yet: the instance thread
    assert runtime.threads == [runtime.threads[0]] and runtime.threads[0] != loop_thread
    check(await burst(scheduler, 16, 1.0), 1.0)
    on_loop = [len(run) for run, thread in zip(runtime.runs, runtime.threads, strict=True) if thread == loop_thread]
    # The burst's first request found nobody and went to the thread; the other 15 queued behind it and ran on
    # the loop once it was free, in batches of at most max_batch_size.
    assert on_loop == [8, 7], (on_loop, [len(r) for r in runtime.runs])
    assert scheduler.stats.execution_count == len(runtime.runs)
    assert scheduler.stats.inference_count == 17
    assert not scheduler.busy
    await scheduler.close()


@pytest.mark.parametrize("pinned", [None, (0, 1)])
async def test_a_lone_client_stays_on_the_instance_thread(
    pinned: tuple[int, ...] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not pinned, or pinned to more than one CPU: the thread's run can overlap the loop's own work."""
    monkeypatch.setattr(cpus, "pinned_cpus", lambda: pinned)
    runtime = FakeRuntime(may_run_on_loop=True)
    scheduler = Scheduler("fake", [runtime], BATCHING, ModelStats())
    for i in range(10):
        check([await one(scheduler, float(i))], float(i))
    assert threading.get_ident() not in runtime.threads
    await scheduler.close()


async def test_a_lone_client_of_a_worker_pinned_to_one_cpu_runs_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned to one CPU, the instance thread could only take turns with the loop: a lone client's batches run on
    the loop once a run has been measured (the first goes to the thread)."""
    monkeypatch.setattr(cpus, "pinned_cpus", lambda: (0,))
    runtime = FakeRuntime(may_run_on_loop=True)
    scheduler = Scheduler("fake", [runtime], BATCHING, ModelStats())
    for i in range(10):
        check([await one(scheduler, float(i))], float(i))
    loop_thread = threading.get_ident()
    assert runtime.threads[0] != loop_thread and runtime.threads[1:] == [loop_thread] * 9
    assert [len(run) for run in runtime.runs] == [1] * 10
    await scheduler.close()


@pytest.mark.parametrize("case", ["runtime does not allow it", "two instances", "runs too long"])
async def test_otherwise_every_run_stays_on_a_thread(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = FakeRuntime(may_run_on_loop=case != "runtime does not allow it")
    if case == "runs too long":
        monkeypatch.setattr(batcher, "LOOP_RUN_LIMIT_NS", 0)
    scheduler = Scheduler("fake", [runtime] * (2 if case == "two instances" else 1), BATCHING, ModelStats())
    check([await one(scheduler, 0.0)])
    for _ in range(3):
        check(await burst(scheduler, 16))
    assert threading.get_ident() not in runtime.threads
    assert sum(len(run) for run in runtime.runs) == 49
    await scheduler.close()


async def test_a_failing_batch_on_the_loop_fails_its_requests_and_the_next_ones_run() -> None:
    runtime = FakeRuntime(may_run_on_loop=True, fail_if=lambda x: bool((x == 99.0).any()))
    scheduler = Scheduler("fake", [runtime], BATCHING, ModelStats())
    check([await one(scheduler, 0.0)])
    outcomes = await asyncio.gather(*(one(scheduler, 99.0 if i == 5 else float(i)) for i in range(9)),
                                    return_exceptions=True)
    loop_thread = threading.get_ident()
    assert loop_thread in runtime.threads
    failed = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)]
    assert 5 in failed and all(isinstance(outcomes[i], ModelRunError) for i in failed)
    for i, outcome in enumerate(outcomes):
        if i not in failed:
            np.testing.assert_array_equal(outcome, np.full((1, 3), 2.0 * i, np.float32))
    check(await burst(scheduler, 9))  # the scheduler goes on
    assert not scheduler.busy
    await scheduler.close()
