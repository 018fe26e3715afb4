"""The per-model scheduler: a bounded priority queue feeding every instance, with dynamic batching.

Each instance has a thread. Dispatch takes the oldest request of the highest priority, adds queued requests
that can share its run (same non-batch shapes and outputs) up to max_batch_size, runs the merged batch on an
idle instance's thread, and hands each request its slice of the outputs. An idle instance starts at once; under
load, requests pile up while instances are busy and the next run takes them together. A single CPU instance
whose runs are short may run its batches on the event loop itself instead (see Scheduler._on_loop).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from server.core.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    ModelRunError,
    QueueFullError,
)
from server.core.instance import InstanceThread, run_instance
from server.core.statistics import ModelStats
from server.runtime import cpus
from server.runtime.base import Runtime

logger = logging.getLogger(__name__)

# Queued requests per model version whatever the config says: bounds memory. Defined once, here,
# beside the queue it bounds; the loader gives it to every model it builds.
HARD_QUEUE_LIMIT = 10_000


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy (timeout_action REJECT).

    Attributes:
        max_queue_size: Most requests waiting at this priority; 0 is unbounded by policy
            (the scheduler's own hard limit still applies).
        default_timeout_us: Time a request may wait in the queue; 0 is no limit.
        allow_timeout_override: Whether a request's `timeout` parameter replaces the default.
    """

    max_queue_size: int = 0
    default_timeout_us: int = 0
    allow_timeout_override: bool = False


@dataclass(frozen=True)
class SchedulerConfig:
    """How one model's requests are queued and batched.

    Attributes:
        max_batch_size: 0 when tensors have no batch dimension (one request per run).
        dynamic_batching: Merge queued requests into one run.
        max_queue_delay_us: How long the oldest request may wait for a fuller batch.
        preferred_batch_sizes: Batch sizes worth dispatching without waiting more.
        priority_levels: Number of priority levels (1 is highest); 0 means one level.
        default_priority_level: Level of requests that give none.
        default_policy: Queue policy of every level without its own.
        priority_policies: Per-level queue policies.
        hard_queue_limit: Upper bound on queued requests whatever the policies say, so
            memory stays bounded.
        adaptive_delay: Wait out max_queue_delay_us only while recent requests arrived to find others
            outstanding (Scheduler._company) and fewer are here than at the recent peak (PEAK_DECAY).
        padded_inputs: Inputs whose first dimension after the batch (a sequence) may differ between
            requests that share a run: each is padded with zeros at the end to the longest.
    """

    max_batch_size: int = 0
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority_level: int = 0
    default_policy: QueuePolicy = QueuePolicy()
    priority_policies: dict[int, QueuePolicy] = field(default_factory=dict)
    hard_queue_limit: int = HARD_QUEUE_LIMIT
    adaptive_delay: bool = False
    padded_inputs: frozenset[str] = frozenset()

    def policy(self, level: int) -> QueuePolicy:
        return self.priority_policies.get(level, self.default_policy)


# The adaptive queue delay's estimate of company: a moving average over arrivals of how many other requests
# (at most COMPANY_CAP) each arrival found outstanding. Waiting for a fuller batch pays only when company
# is likely; a closed-loop client alone always finds nobody (its next request comes after this answer).
COMPANY_WEIGHT = 0.2
COMPANY_CAP = 2
COMPANY_THRESHOLD = 0.5

# Nor does it wait once as many requests are queued or running as at the recent peak: a closed-loop group of N
# clients never has more than N in the server, so with all N here nobody else is coming. The peak decays by this
# factor per arrival, forgetting a client that left within ~700 arrivals.
PEAK_DECAY = 0.999
# Below this company a client is alone (about the last ten arrivals found nobody): see Scheduler._on_loop.
LONE_COMPANY = 0.1

# Runs on the event loop (Scheduler._on_loop) only while the model's recent runs took at most this long: the
# loop serves no other call meanwhile, so the bound keeps that pause within the batching delay's order.
LOOP_RUN_LIMIT_NS = 1_000_000
RUN_TIME_WEIGHT = 0.25  # weight of the newest run in the moving average of run times

# What requests must share to run together (see _batch_key): each input's non-batch shape, then the outputs.
BatchKey = tuple[object, ...]


@dataclass(eq=False)
class PendingRequest:
    """A request waiting for (or in) a run."""

    inputs: dict[str, np.ndarray]
    batch_size: int
    output_names: tuple[str, ...]
    level: int
    key: BatchKey
    enqueued_ns: int
    future: asyncio.Future[list[np.ndarray]]
    timer: asyncio.TimerHandle | None = None
    queued: bool = True


class Scheduler:
    """Queues requests for one model version and runs them on its instances.

    Dispatch happens when a request arrives and when a run finishes: an idle instance
    takes the head of the queue at once (no waiting at low load); while every instance
    is busy, requests accumulate and the next free instance takes them together.

    Args:
        name: Model name, for logs.
        instances: The model's runtimes; each gets a thread and runs one batch at a time.
        config: Queueing and batching settings.
        stats: Where statistics are recorded.
    """

    def __init__(self, name: str, instances: Sequence[Runtime], config: SchedulerConfig, stats: ModelStats) -> None:
        self.name = name
        self.config = config
        self.stats = stats
        self._threads = [InstanceThread(r, f"ort-{name}-{i}") for i, r in enumerate(instances)]
        self._idle = list(self._threads)
        levels = max(config.priority_levels, 1)
        self._queues: list[collections.deque[PendingRequest]] = [collections.deque() for _ in range(levels)]
        self._queued_per_level = [0] * levels
        self._queued = 0
        self._default_level = self.priority_level(0)  # the level of every request that names none
        self._delay_timer: asyncio.TimerHandle | None = None
        self._delay_deadline_ns = 0  # when the armed delay timer's wait ends
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first submit
        self._outstanding = 0  # submitted and not yet answered (queued or running)
        self._company = 0.0  # see COMPANY_WEIGHT
        self._running = 0  # requests in runs not yet finished
        self._peak = 0.0  # the most requests queued or running at once, decaying (PEAK_DECAY)
        self._loop_capable = len(self._threads) == 1 and instances[0].may_run_on_loop  # see _on_loop
        pinned = cpus.pinned_cpus()  # pinned to one CPU, the instance thread shares the loop's (cpus.pin_worker)
        self._one_cpu = pinned is not None and len(pinned) == 1
        self._run_ns = 0.0  # moving average of run times (RUN_TIME_WEIGHT); 0 until a run is measured

    @property
    def queued(self) -> int:
        """Requests waiting, not yet taken by an instance."""
        return self._queued

    @property
    def busy(self) -> bool:
        """Whether any request is queued or running."""
        return self._queued > 0 or len(self._idle) < len(self._threads)

    def priority_level(self, priority: int) -> int:
        """Queue index of a request `priority` (1 = highest; 0 = the model's default)."""
        levels = max(self.config.priority_levels, 1)
        if priority == 0:
            priority = self.config.default_priority_level or 1
        if priority < 1 or priority > levels:
            raise InvalidInputError(f"priority {priority} is out of range; model '{self.name}' has {levels} level(s)")
        return priority - 1

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        batch_size: int,
        output_names: Sequence[str],
        priority: int = 0,
        timeout_us: int = 0,
        deadline_s: float | None = None,
    ) -> list[np.ndarray]:
        """Queues a validated request and waits for its outputs.

        Args:
            inputs: Input arrays (with the batch dimension when the model batches).
            batch_size: The request's batch size (0 when the model does not batch).
            output_names: Outputs to compute, in the order they are returned.
            priority: The request's `priority` parameter.
            timeout_us: The request's `timeout` parameter (microseconds in queue; 0 none).
            deadline_s: Seconds left before the client's gRPC deadline, if any.

        Raises:
            QueueFullError: the queue for this priority is full.
            DeadlineExceededError: the request expired in the queue (it never ran).
        """
        if self._closed:
            raise ModelNotReadyError(f"model '{self.name}' is being unloaded")
        level = self._default_level if priority == 0 else self.priority_level(priority)
        policy = self.config.policy(level)
        limit = self.config.hard_queue_limit
        if self._queued >= limit or (policy.max_queue_size and self._queued_per_level[level] >= policy.max_queue_size):
            raise QueueFullError(f"model '{self.name}' has too many queued requests; retry later")
        timeout_s = _queue_timeout_s(policy, timeout_us)
        if deadline_s is not None:
            timeout_s = deadline_s if timeout_s is None else min(timeout_s, deadline_s)
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceededError(f"request to model '{self.name}' expired before it was queued")
        loop = self._loop
        if loop is None:
            # The loop the scheduler serves on, looked up once: per request it was ~2% of the loop's time
            # (bench/profile_breakdown.py), and every request and callback runs on this one loop.
            loop = self._loop = asyncio.get_running_loop()
        pending = PendingRequest(
            inputs=inputs,
            batch_size=batch_size,
            output_names=tuple(output_names),
            level=level,
            key=_batch_key(inputs, output_names, self.config.padded_inputs),
            enqueued_ns=time.perf_counter_ns(),
            future=loop.create_future(),
        )
        if timeout_s is not None:
            pending.timer = loop.call_later(timeout_s, self._expire, pending)
        self._company += COMPANY_WEIGHT * (min(self._outstanding, COMPANY_CAP) - self._company)
        self._outstanding += 1
        self._queues[level].append(pending)
        self._queued_per_level[level] += 1
        self._queued += 1
        self._peak = max(float(self._queued + self._running), self._peak * PEAK_DECAY)
        self._dispatch()
        try:
            return await pending.future
        finally:
            self._outstanding -= 1
            # Cancelled (client gone) or expired: leave the queue now, never run.
            self._dequeue(pending)
            if pending.timer is not None:
                pending.timer.cancel()

    def _dequeue(self, pending: PendingRequest) -> None:
        if pending.queued:
            pending.queued = False
            self._queued -= 1
            self._queued_per_level[pending.level] -= 1

    def _expire(self, pending: PendingRequest) -> None:
        if pending.queued and not pending.future.done():
            self._dequeue(pending)
            pending.future.set_exception(
                DeadlineExceededError(f"request to model '{self.name}' timed out in the queue and was not run")
            )

    def _collect(self) -> list[PendingRequest]:
        """The head request and every queued request that can share its run."""
        head: PendingRequest | None = None
        for level_queue in self._queues:
            while level_queue and not level_queue[0].queued:
                level_queue.popleft()
            if level_queue:
                head = level_queue[0]
                break
        if head is None:
            return []
        if not self.config.dynamic_batching or self.config.max_batch_size == 0:
            return [head]
        batch, total = [head], head.batch_size
        limit = self.config.max_batch_size
        for level_queue in self._queues:
            for pending in level_queue:
                if total >= limit:
                    return batch
                if pending is head or not pending.queued or pending.key != head.key:
                    continue
                if total + pending.batch_size <= limit:
                    batch.append(pending)
                    total += pending.batch_size
        return batch

    def _worth_waiting(self, batch: list[PendingRequest]) -> float:
        """Seconds to wait for a fuller batch (0: dispatch now)."""
        delay_us = self.config.max_queue_delay_us
        if not self.config.dynamic_batching or delay_us <= 0:
            return 0.0
        here = self._queued + self._running
        if self.config.adaptive_delay and (self._company < COMPANY_THRESHOLD or here >= self._peak):
            return 0.0  # nobody is likely to come in time, or everyone is already here: waiting would only add latency
        size = sum(p.batch_size for p in batch)
        preferred = self.config.preferred_batch_sizes
        if size >= self.config.max_batch_size or size in preferred or (preferred and size > max(preferred)):
            return 0.0
        waited_s = (time.perf_counter_ns() - batch[0].enqueued_ns) / 1e9
        return max(0.0, delay_us / 1e6 - waited_s)

    def _dispatch(self, waited: bool = False) -> None:
        """Starts runs on idle instances for as long as there is queued work.

        Args:
            waited: The delay timer fired: the head has waited for a fuller batch as long as it may.
        """
        loop = self._loop or asyncio.get_running_loop()
        while self._idle and self._queued and not self._closed:
            batch = self._collect()
            if not batch:
                return
            wait_s = 0.0 if waited else self._worth_waiting(batch)
            if wait_s > 0:
                # One timer per wait, armed once: re-armed on every arrival, each re-arming cost a whole
                # dispatch, and ~7 dispatches ran per request (uvloop's timers count whole milliseconds, so a
                # remainder under 0.5 ms fires on the next pass and was re-armed, until the delay ran out).
                if self._delay_timer is None:
                    self._delay_deadline_ns = time.perf_counter_ns() + int(wait_s * 1e9)
                    self._delay_timer = loop.call_later(wait_s, self._delay_over)
                return
            waited = False  # only the batch that waited skips waiting; the next instance's batch decides anew
            if self._delay_timer is not None:
                self._delay_timer.cancel()
                self._delay_timer = None
            if self._on_loop():
                # The batch is gathered when the run starts, after the calls the loop has ready now.
                loop.call_soon(self._run_on_loop, self._idle.pop())
                return
            self._take(batch)
            self._start(loop, self._idle.pop(), batch)

    def _delay_over(self) -> None:
        remaining_ns = self._delay_deadline_ns - time.perf_counter_ns()
        if remaining_ns > 0:
            # Fired early (whole-millisecond timers): wait out the rest, so the batch fills for as long as the
            # config allows; each early pass costs this check only.
            self._delay_timer = (self._loop or asyncio.get_running_loop()).call_later(
                remaining_ns / 1e9, self._delay_over
            )
            return
        self._delay_timer = None
        self._dispatch(waited=True)

    def _on_loop(self) -> bool:
        """Whether the next batch runs on the event loop rather than on the instance's thread.

        Handing a batch to a thread and its answer back costs a wake-up of each and a contest for the GIL
        (bench/run_ladder.py: the echo answering from a second thread took 1.13-1.43x its CPU per request);
        under load, with runs this short, the loop does better running it and gathering the next calls
        after. Not at low load: there the thread's run overlaps the loop finishing the call's own work
        (concurrency 1 p50 8% better on a thread), unless the worker is pinned to one CPU, where the thread
        can only take turns with the loop (c=1 p50 x0.93-0.95 on the loop). Only a client truly alone
        (LONE_COMPANY) runs there, so a loaded loop cannot settle into running each arrival by itself.
        """
        if not self._loop_capable or not 0 < self._run_ns <= LOOP_RUN_LIMIT_NS:
            return False
        return self._company >= COMPANY_THRESHOLD or (self._one_cpu and self._company < LONE_COMPANY)

    def _take(self, batch: list[PendingRequest]) -> None:
        """Removes the batch's requests from the queue: they are about to run."""
        self._running += len(batch)
        for pending in batch:
            self._dequeue(pending)
            if pending.timer is not None:
                pending.timer.cancel()

    def _merged(self, batch: list[PendingRequest], start: int) -> dict[str, np.ndarray]:
        """The batch's inputs as one feed (padding where the config says), its queue waits recorded."""
        for pending in batch:
            self.stats.queue_wait(start - pending.enqueued_ns)
        head = batch[0]
        if len(batch) == 1:
            return head.inputs
        padded = self.config.padded_inputs
        return {
            name: _padded_concatenate([p.inputs[name] for p in batch]) if name in padded
            else np.concatenate([p.inputs[name] for p in batch])
            for name in head.inputs
        }

    def _start(self, loop: asyncio.AbstractEventLoop, thread: InstanceThread, batch: list[PendingRequest]) -> None:
        start = time.perf_counter_ns()
        try:
            feed = self._merged(batch, start)
        except Exception as exc:  # cannot happen for validated requests; never strand them
            self._finish_batch(thread, batch, None, exc, 0, 0)
            return
        input_ns = time.perf_counter_ns() - start

        def done(results: list[np.ndarray] | None, infer_ns: int, error: BaseException | None) -> None:
            self._finish_batch(thread, batch, results, error, input_ns, infer_ns)

        thread.submit(loop, feed, batch[0].output_names, done)

    def _run_on_loop(self, thread: InstanceThread) -> None:
        """Runs what is queued now as one batch, here on the loop (see _on_loop)."""
        batch = [] if self._closed else self._collect()
        if not batch:  # expired, cancelled or failed by close() since the dispatch
            self._idle.append(thread)
            return
        self._take(batch)
        start = time.perf_counter_ns()
        try:
            feed = self._merged(batch, start)
            input_ns = time.perf_counter_ns() - start
            results, infer_ns = run_instance(thread.runtime, feed, batch[0].output_names)
        except Exception as exc:  # every failure is handed to the requests of the batch
            self._finish_batch(thread, batch, None, exc, 0, 0)
        else:
            self._finish_batch(thread, batch, results, None, input_ns, infer_ns)

    def _finish_batch(
        self,
        thread: InstanceThread,
        batch: list[PendingRequest],
        results: list[np.ndarray] | None,
        error: BaseException | None,
        input_ns: int,
        infer_ns: int,
    ) -> None:
        self._idle.append(thread)
        self._running -= len(batch)
        if infer_ns > 0:
            self._run_ns = infer_ns if self._run_ns == 0 else self._run_ns + RUN_TIME_WEIGHT * (infer_ns - self._run_ns)
        if error is not None or results is None:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error or ModelRunError("model run failed"))
        else:
            out_start = time.perf_counter_ns()
            offset = 0
            for pending in batch:
                if len(batch) == 1:
                    outputs = results
                else:
                    outputs = [r[offset : offset + pending.batch_size] for r in results]
                offset += pending.batch_size
                if not pending.future.done():
                    pending.future.set_result(outputs)
            output_ns = time.perf_counter_ns() - out_start
            total = sum(p.batch_size for p in batch)
            self.stats.record_execution(max(total, 1), len(batch), input_ns, infer_ns, output_ns)
        if self._queued:
            self._dispatch()

    async def close(self) -> None:
        """Fails what is still queued, lets running batches finish, and stops the instance threads."""
        self._closed = True
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        for level_queue in self._queues:
            for pending in level_queue:
                if pending.queued and not pending.future.done():
                    self._dequeue(pending)
                    pending.future.set_exception(ModelNotReadyError(f"model '{self.name}' is being unloaded"))
            level_queue.clear()
        await asyncio.to_thread(self.stop_threads)

    def stop_threads(self) -> None:
        """Ends the instance threads (blocking; after their current batch)."""
        for thread in self._threads:
            thread.stop()


def _queue_timeout_s(policy: QueuePolicy, request_timeout_us: int) -> float | None:
    timeout_us = policy.default_timeout_us
    if request_timeout_us > 0 and (policy.allow_timeout_override or timeout_us == 0):
        timeout_us = request_timeout_us
    return timeout_us / 1e6 if timeout_us > 0 else None


def _batch_key(
    inputs: dict[str, np.ndarray], output_names: Sequence[str], padded: frozenset[str] = frozenset()
) -> BatchKey:
    """Requests share a run only with equal non-batch shapes (but for a padded input's sequence length)
    and the same outputs."""
    return tuple(
        (name, inputs[name].shape[2:] if name in padded else inputs[name].shape[1:]) for name in sorted(inputs)
    ) + (tuple(output_names),)


def _padded_concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays stacked along the batch, each padded with zeros at the end of dimension 1 to the longest."""
    longest = max(a.shape[1] for a in arrays)
    if all(a.shape[1] == longest for a in arrays):
        return np.concatenate(arrays)
    merged = np.zeros((sum(a.shape[0] for a in arrays), longest, *arrays[0].shape[2:]), arrays[0].dtype)
    row = 0
    for array in arrays:
        merged[row:row + array.shape[0], :array.shape[1]] = array
        row += array.shape[0]
    return merged
