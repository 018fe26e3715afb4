"""Per-model inference statistics with Triton's ModelStatistics meaning."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """A count of events and their total time in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    """Compute times of executions that ran with one particular batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Cumulative statistics of one model version.

    Triton's meaning: `success`/`fail` time a request end to end inside the server;
    `queue` is time waiting for an instance; `compute_*` are per request;
    `inference_count` counts batch elements, `execution_count` counts model runs.
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch_stats: dict[int, BatchStats] = field(default_factory=dict)
    # Executions finish on worker threads; one lock keeps the counters consistent.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_execution(
        self, batch_size: int, request_count: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """Records one model run that served `request_count` requests of `batch_size` elements."""
        with self._lock:
            self.execution_count += 1
            self.inference_count += batch_size
            self.last_inference_ms = time.time_ns() // 1_000_000
            per_batch = self.batch_stats.setdefault(batch_size, BatchStats())
            per_batch.compute_input.add(input_ns)
            per_batch.compute_infer.add(infer_ns)
            per_batch.compute_output.add(output_ns)
            self.compute_input.add(input_ns * request_count, request_count)
            self.compute_infer.add(infer_ns * request_count, request_count)
            self.compute_output.add(output_ns * request_count, request_count)

    def record_request(self, ok: bool, total_ns: int) -> None:
        """Records the end of one request, success or failure, with its time in the server."""
        with self._lock:
            (self.success if ok else self.fail).add(total_ns)

    def queue_wait(self, ns: int) -> None:
        """Records one request's time between arrival in the queue and the start of its run."""
        with self._lock:
            self.queue.add(ns)
