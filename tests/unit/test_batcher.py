"""The scheduler on the fake runtime: merging, splitting, waiting, expiry, cancellation, priority."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.core.batcher import QueuePolicy, Scheduler, SchedulerConfig
from server.core.errors import DeadlineExceededError, InvalidInputError, QueueFullError
from server.core.statistics import ModelStats
from tests.fake_runtime import FakeRuntime


def make(config: SchedulerConfig, runtime: FakeRuntime, instances: int = 1) -> Scheduler:
    return Scheduler("fake", [runtime] * instances, config, ModelStats())


def batch(value: float, size: int, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((size, width), value, np.float32)}


async def submit(scheduler: Scheduler, value: float, size: int = 1, **kwargs: object) -> np.ndarray:
    [y] = await scheduler.submit(batch(value, size), size, ["y"], **kwargs)
    return y


async def wait_until(predicate, what: str, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Polls observable state; the generous timeout is only reached when something is broken."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def wait_for_runs(runtime: FakeRuntime, count: int) -> None:
    await wait_until(lambda: len(runtime.runs) >= count, f"{count} runs to start (have {len(runtime.runs)})")


async def wait_queued(scheduler: Scheduler, count: int) -> None:
    await wait_until(lambda: scheduler.queued == count, f"{count} queued requests (have {scheduler.queued})")


BATCHING = SchedulerConfig(max_batch_size=8, dynamic_batching=True)


async def test_requests_are_merged_and_split_back() -> None:
    runtime = FakeRuntime(held=True)
    scheduler = make(BATCHING, runtime)
    first = asyncio.create_task(submit(scheduler, 100.0))
    await wait_for_runs(runtime, 1)  # the instance is now busy
    sizes = [1, 3, 2, 4, 1, 2, 1, 3]
    pending = asyncio.gather(*(submit(scheduler, float(i), size) for i, size in enumerate(sizes)))
    await wait_queued(scheduler, len(sizes))
    runtime.release()
    results = await pending
    await first
    for i, (size, y) in enumerate(zip(sizes, results, strict=True)):
        assert y.shape == (size, 3)
        np.testing.assert_array_equal(y, np.full((size, 3), 2.0 * i, np.float32))
    merged = [len(run) for run in runtime.runs[1:]]
    assert sum(merged) == sum(sizes)
    assert max(merged) <= 8 and len(merged) < len(sizes)
    stats = scheduler.stats
    assert stats.inference_count == 1 + sum(sizes)
    assert stats.execution_count == len(runtime.runs)
    assert sum(b.compute_infer.count for b in stats.batch_stats.values()) == stats.execution_count
    assert stats.compute_infer.count == 1 + len(sizes)  # per request
    assert stats.queue.count == 1 + len(sizes)


async def test_different_shapes_are_never_merged() -> None:
    runtime = FakeRuntime(held=True)
    scheduler = make(BATCHING, runtime)
    first = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)
    wide = scheduler.submit({"x": np.ones((1, 5), np.float32)}, 1, ["y"])
    narrow = scheduler.submit({"x": np.ones((2, 3), np.float32)}, 2, ["y"])
    both = asyncio.gather(wide, narrow)
    await wait_queued(scheduler, 2)
    runtime.release()
    [y_wide], [y_narrow] = await both
    await first
    assert y_wide.shape == (1, 5) and y_narrow.shape == (2, 3)
    assert sorted(run.shape for run in runtime.runs[1:]) == [(1, 5), (2, 3)]


async def test_idle_instance_dispatches_at_once() -> None:
    runtime = FakeRuntime(held=True)
    scheduler = make(BATCHING, runtime)  # max_queue_delay 0
    first = asyncio.create_task(submit(scheduler, 1.0))
    await wait_for_runs(runtime, 1)
    second = asyncio.create_task(submit(scheduler, 2.0))
    await wait_queued(scheduler, 1)
    runtime.release()
    await asyncio.gather(first, second)
    assert [len(r) for r in runtime.runs] == [1, 1]  # the first did not wait for company


async def test_queue_delay_waits_for_company() -> None:
    # A delay far longer than any test: the first request can only leave with company
    # (the batch is full at 2 rows), so nothing depends on how fast the machine is.
    runtime = FakeRuntime()
    config = SchedulerConfig(max_batch_size=2, dynamic_batching=True, max_queue_delay_us=600_000_000)
    scheduler = make(config, runtime)
    first = asyncio.create_task(submit(scheduler, 1.0))
    await wait_queued(scheduler, 1)
    await asyncio.sleep(0.01)
    assert runtime.runs == [] and not first.done()  # waiting for company
    second = asyncio.create_task(submit(scheduler, 2.0))
    await asyncio.wait_for(asyncio.gather(first, second), timeout=60)
    assert [len(r) for r in runtime.runs] == [2]


async def test_preferred_batch_size_dispatches_without_waiting_out_the_delay() -> None:
    runtime = FakeRuntime()
    config = SchedulerConfig(
        max_batch_size=8, dynamic_batching=True, max_queue_delay_us=30_000_000, preferred_batch_sizes=(4,)
    )
    scheduler = make(config, runtime)
    results = await asyncio.wait_for(asyncio.gather(*(submit(scheduler, float(i)) for i in range(4))), timeout=10)
    assert len(results) == 4
    assert [len(r) for r in runtime.runs] == [4]


async def test_queue_full_is_refused_at_once() -> None:
    runtime = FakeRuntime(held=True)
    config = SchedulerConfig(max_batch_size=8, dynamic_batching=True, default_policy=QueuePolicy(max_queue_size=2))
    scheduler = make(config, runtime)
    running = asyncio.create_task(submit(scheduler, 0.0, size=8))
    await wait_for_runs(runtime, 1)
    queued = [asyncio.create_task(submit(scheduler, 1.0, size=8)) for _ in range(2)]
    await wait_queued(scheduler, 2)
    with pytest.raises(QueueFullError):
        await submit(scheduler, 2.0)
    runtime.release()
    await asyncio.gather(running, *queued)


async def test_expired_in_queue_never_runs() -> None:
    runtime = FakeRuntime(held=True)
    scheduler = make(BATCHING, runtime)
    running = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)
    with pytest.raises(DeadlineExceededError):
        await submit(scheduler, 7.0, timeout_us=30_000)
    with pytest.raises(DeadlineExceededError):
        await submit(scheduler, 8.0, deadline_s=0.03)
    runtime.release()
    await running
    await submit(scheduler, 9.0)
    assert [float(r[0, 0]) for r in runtime.runs] == [0.0, 9.0]
    assert scheduler.queued == 0


async def test_default_timeout_and_override_policy() -> None:
    runtime = FakeRuntime(held=True)
    policy = QueuePolicy(default_timeout_us=20_000, allow_timeout_override=False)
    scheduler = make(SchedulerConfig(max_batch_size=8, dynamic_batching=True, default_policy=policy), runtime)
    running = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)
    with pytest.raises(DeadlineExceededError):
        await submit(scheduler, 1.0, timeout_us=10_000_000)  # may not extend the default
    runtime.release()
    await running


async def test_cancelled_while_queued_never_runs() -> None:
    runtime = FakeRuntime(held=True)
    scheduler = make(BATCHING, runtime)
    running = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)
    doomed = asyncio.create_task(submit(scheduler, 5.0))
    await wait_queued(scheduler, 1)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert scheduler.queued == 0
    runtime.release()
    await running
    await submit(scheduler, 6.0)
    assert [float(r[0, 0]) for r in runtime.runs] == [0.0, 6.0]


async def test_priority_order() -> None:
    runtime = FakeRuntime(held=True)
    config = SchedulerConfig(max_batch_size=8, dynamic_batching=False, priority_levels=2, default_priority_level=2)
    scheduler = make(config, runtime)
    running = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)
    low1 = asyncio.create_task(submit(scheduler, 1.0))
    low2 = asyncio.create_task(submit(scheduler, 2.0, priority=2))
    await wait_queued(scheduler, 2)
    high = asyncio.create_task(submit(scheduler, 3.0, priority=1))
    await wait_queued(scheduler, 3)
    runtime.release()
    await asyncio.gather(running, low1, low2, high)
    assert [float(r[0, 0]) for r in runtime.runs] == [0.0, 3.0, 1.0, 2.0]
    with pytest.raises(InvalidInputError, match="priority 3"):
        await submit(scheduler, 1.0, priority=3)


async def test_instances_run_concurrently() -> None:
    runtime = FakeRuntime(held=True)
    scheduler = make(SchedulerConfig(max_batch_size=8, dynamic_batching=False), runtime, instances=3)
    results = asyncio.gather(*(submit(scheduler, float(i)) for i in range(3)))
    await wait_for_runs(runtime, 3)  # three runs started while none may finish: they overlap
    runtime.release()
    await results
    assert runtime.max_concurrent == 3


async def test_failed_batch_fails_every_request_in_it_and_the_next_runs() -> None:
    runtime = FakeRuntime(held=True, fail_if=lambda x: bool((x == 13.0).any()))
    scheduler = make(BATCHING, runtime)
    running = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)
    doomed = [asyncio.create_task(submit(scheduler, v)) for v in (12.0, 13.0, 14.0)]
    await wait_queued(scheduler, 3)
    runtime.release()
    outcomes = await asyncio.gather(*doomed, return_exceptions=True)
    await running
    assert len(runtime.runs) == 2 and len(runtime.runs[1]) == 3  # one merged run
    assert all(isinstance(o, Exception) and "fake failure" in str(o) for o in outcomes)
    np.testing.assert_array_equal(await submit(scheduler, 1.0), np.full((1, 3), 2.0, np.float32))
    await scheduler.close()


ADAPTIVE = SchedulerConfig(max_batch_size=8, dynamic_batching=True, max_queue_delay_us=600_000_000, adaptive_delay=True)


async def test_adaptive_delay_serves_a_lone_client_at_once() -> None:
    """A closed-loop client alone never finds company: each request runs at once despite a 600 s delay."""
    runtime = FakeRuntime()
    scheduler = make(ADAPTIVE, runtime)
    for i in range(5):
        await asyncio.wait_for(submit(scheduler, float(i)), timeout=60)
    assert [len(r) for r in runtime.runs] == [1] * 5


async def test_adaptive_delay_waits_once_arrivals_find_company() -> None:
    """Requests that arrive while others are outstanding make the scheduler wait for a fuller batch again, until as
    many are queued or running as at the recent peak: then everyone is here, and the batch runs at once."""
    runtime = FakeRuntime(held=True)
    scheduler = make(ADAPTIVE, runtime)
    first = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)  # ran at once: it found nobody
    queued = [asyncio.create_task(submit(scheduler, float(i))) for i in range(1, 5)]
    await wait_queued(scheduler, 4)  # each arrived to find the first (and the earlier ones) outstanding: 5 at the peak
    runtime.release()
    await first
    # The four queued requests now wait for company (4 here against 5 at the peak, the delay far off).
    await wait_until(lambda: scheduler._delay_timer is not None, "the delay timer")
    assert scheduler.queued == 4 and len(runtime.runs) == 1
    fifth = asyncio.create_task(submit(scheduler, 5.0))  # as many as at the peak: nobody else is coming
    await asyncio.wait_for(asyncio.gather(*queued, fifth), timeout=60)
    assert [len(r) for r in runtime.runs] == [1, 5]


async def test_adaptive_delay_serves_a_closed_group_without_waiting_out_the_delay() -> None:
    """Four clients, each sending its next request when the last is answered (as perf_analyzer's do), never wait
    out the 600 s delay: once all four are queued or running, nobody else can come. (When one of them stops, the
    others wait out the delay until the peak has forgotten it, so the clients here never stop on their own.)"""
    runtime = FakeRuntime()
    scheduler = make(ADAPTIVE, runtime)
    answered = 0

    async def client(index: int) -> None:
        nonlocal answered
        for i in range(1_000_000):
            y = await submit(scheduler, float(index * 1000 + i % 1000))
            np.testing.assert_array_equal(y, np.full((1, 3), 2.0 * (index * 1000 + i % 1000), np.float32))
            answered += 1

    clients = [asyncio.create_task(client(c)) for c in range(4)]
    await wait_until(lambda: answered >= 40 or any(c.done() for c in clients), "40 answers")
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    assert answered >= 40
    assert max(len(r) for r in runtime.runs) <= 4  # never more rows than clients
    assert [len(r) for r in runtime.runs[:6]] == [1, 4, 4, 4, 4, 4]  # the first ran alone; then the group together


async def test_without_adaptive_delay_a_lone_request_waits_out_the_delay() -> None:
    """Triton's behaviour, kept with `adaptive_queue_delay: false`: the lone request waits for company."""
    runtime = FakeRuntime()
    config = SchedulerConfig(max_batch_size=2, dynamic_batching=True, max_queue_delay_us=600_000_000)
    scheduler = make(config, runtime)
    first = asyncio.create_task(submit(scheduler, 1.0))
    await wait_queued(scheduler, 1)
    await wait_until(lambda: scheduler._delay_timer is not None, "the delay timer")
    assert runtime.runs == [] and not first.done()
    await asyncio.wait_for(asyncio.gather(first, submit(scheduler, 2.0)), timeout=60)
    assert [len(r) for r in runtime.runs] == [2]


@pytest.mark.parametrize("value,expected", [(None, True), ("true", True), ("false", False), ("0", False)])
def test_adaptive_queue_delay_parameter(value: str | None, expected: bool) -> None:
    from google.protobuf import text_format

    from server.repository.config import scheduler_config
    from server.schema import model_config_pb2 as mc

    config = text_format.Parse("max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 1000 }",
                               mc.ModelConfig())
    if value is not None:
        config.parameters["adaptive_queue_delay"].string_value = value
    assert scheduler_config(config, 100).adaptive_delay is expected
    assert ("adaptive_queue_delay" in config.parameters) is (value is not None)  # reading added no key


async def test_padded_inputs_let_different_lengths_share_a_run() -> None:
    """With `x` padded, requests of lengths 2, 5 and 3 run together, zero-padded at the end to 5."""
    runtime = FakeRuntime(held=True)
    config = SchedulerConfig(max_batch_size=8, dynamic_batching=True, padded_inputs=frozenset({"x"}))
    scheduler = make(config, runtime)
    first = asyncio.create_task(submit(scheduler, 0.0))
    await wait_for_runs(runtime, 1)
    lengths = [2, 5, 3]
    pending = asyncio.gather(*(scheduler.submit(batch(float(i + 1), 1, width), 1, ["y"])
                               for i, width in enumerate(lengths)))
    await wait_queued(scheduler, 3)
    runtime.release()
    results = await pending
    await first
    merged = runtime.runs[1]
    assert merged.shape == (3, 5)
    for row, (value, width) in enumerate(zip((1.0, 2.0, 3.0), lengths, strict=True)):
        np.testing.assert_array_equal(merged[row, :width], value)
        np.testing.assert_array_equal(merged[row, width:], 0.0)
    assert [y.shape for [y] in results] == [(1, 5)] * 3  # the outputs as the model computed them
    # (Without padded_inputs, different shapes never share a run: test_different_shapes_are_never_merged.)


@pytest.mark.parametrize("parameter,error", [
    ("nope", "which is not an input"),
    ("y", "which is not an input"),
])
def test_pad_batch_inputs_refusals(parameter: str, error: str) -> None:
    from google.protobuf import text_format

    from server.core.errors import ModelLoadError
    from server.core.model import ModelSignature
    from server.core.types import TensorSpec
    from server.repository.config import scheduler_config
    from server.repository.loader import _with_padding
    from server.schema import model_config_pb2 as mc

    config = text_format.Parse("max_batch_size: 8 dynamic_batching { }", mc.ModelConfig())
    config.parameters["pad_batch_inputs"].string_value = parameter
    signature = ModelSignature([TensorSpec("x", "INT64", (-1,))], [TensorSpec("y", "FP32", (4,))], 8)
    with pytest.raises(ModelLoadError, match=error):
        _with_padding(scheduler_config(config, 100), config, signature)
    config.parameters["pad_batch_inputs"].string_value = "x"
    assert _with_padding(scheduler_config(config, 100), config, signature).padded_inputs == {"x"}
    varying = ModelSignature([TensorSpec("x", "INT64", (-1,))], [TensorSpec("y", "FP32", (-1,))], 8)
    with pytest.raises(ModelLoadError, match="variable dimension"):
        _with_padding(scheduler_config(config, 100), config, varying)
    fixed = ModelSignature([TensorSpec("x", "INT64", (3,))], [TensorSpec("y", "FP32", (4,))], 8)
    with pytest.raises(ModelLoadError, match="no variable first dimension"):
        _with_padding(scheduler_config(config, 100), config, fixed)


def test_the_delay_is_waited_out_in_full_on_uvloop() -> None:
    """uvloop's timers count whole milliseconds: a 1.4 ms wait armed as one timer fires after about 1.1 ms. The head
    must still wait its full delay (its own queue time, a lower bound a slow machine cannot fail), and its company
    runs with it."""
    import uvloop

    waits: list[int] = []

    async def scenario() -> None:
        runtime = FakeRuntime()
        scheduler = make(SchedulerConfig(max_batch_size=8, dynamic_batching=True, max_queue_delay_us=1_400), runtime)
        scheduler.stats.queue_wait = waits.append  # type: ignore[method-assign]
        results = await asyncio.gather(*(submit(scheduler, float(i)) for i in range(4)))
        for i, y in enumerate(results):
            np.testing.assert_array_equal(y, np.full((1, 3), 2.0 * i, np.float32))
        assert [len(run) for run in runtime.runs] == [4]
        await scheduler.close()

    uvloop.run(scenario())
    assert len(waits) == 4 and max(waits) >= 1_400_000, f"the head waited {max(waits) / 1e6:.3f} ms"
