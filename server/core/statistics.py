"""Per-model inference statistics with Triton's ModelStatistics meaning, and the histograms metrics add."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from server.core.errors import DeadlineExceededError, ModelRunError, QueueFullError
from server.core.histogram import (
    BATCH_SIZE_BUCKETS,
    INTER_TOKEN_LATENCY_BUCKETS_S,
    LATENCY_BUCKETS_S,
    REQUEST_LATENCY_BUCKETS_S,
    TIME_TO_FIRST_TOKEN_BUCKETS_S,
    Histogram,
)

# Why a request failed, as Triton's nv_inference_request_failure `reason` label says it.
REJECTED = "REJECTED"  # refused by the scheduler: queue full, or timed out waiting in it
CANCELED = "CANCELED"  # the client cancelled (or went away)
BACKEND = "BACKEND"  # the model run failed
OTHER = "OTHER"  # anything else: an invalid input, a model unloaded under it, ...
FAILURE_REASONS = (REJECTED, CANCELED, BACKEND, OTHER)


def failure_reason(error: BaseException) -> str:
    """The failure reason of a request that ended with `error`."""
    if isinstance(error, (QueueFullError, DeadlineExceededError)):
        return REJECTED
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return CANCELED
    if isinstance(error, ModelRunError):
        return BACKEND
    return OTHER


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
    # Beyond Triton's statistics, for metrics: failures by reason and latency histograms (seconds).
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    request_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    queue_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    compute_infer_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    load_seconds: float = 0.0
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
            self.compute_infer_seconds.observe(infer_ns / 1e9, request_count)
            self.batch_sizes.observe(batch_size)

    def record_request(self, failure: str | None, total_ns: int) -> None:
        """Records the end of one request with its time in the server.

        Args:
            failure: None for a success, else its reason (one of FAILURE_REASONS).
        """
        with self._lock:
            if failure is None:
                self.success.add(total_ns)
                self.request_seconds.observe(total_ns / 1e9)
            else:
                self.fail.add(total_ns)
                self.failures[failure] += 1

    def frozen(self) -> ModelStats:
        """A consistent copy of every counter and histogram (for statistics and metrics), taken under the lock."""
        with self._lock:
            return ModelStats(
                success=Duration(self.success.count, self.success.ns),
                fail=Duration(self.fail.count, self.fail.ns),
                queue=Duration(self.queue.count, self.queue.ns),
                compute_input=Duration(self.compute_input.count, self.compute_input.ns),
                compute_infer=Duration(self.compute_infer.count, self.compute_infer.ns),
                compute_output=Duration(self.compute_output.count, self.compute_output.ns),
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                last_inference_ms=self.last_inference_ms,
                batch_stats={
                    size: BatchStats(
                        Duration(b.compute_input.count, b.compute_input.ns),
                        Duration(b.compute_infer.count, b.compute_infer.ns),
                        Duration(b.compute_output.count, b.compute_output.ns),
                    )
                    for size, b in self.batch_stats.items()
                },
                failures=dict(self.failures),
                request_seconds=self.request_seconds.copy(),
                queue_seconds=self.queue_seconds.copy(),
                compute_infer_seconds=self.compute_infer_seconds.copy(),
                batch_sizes=self.batch_sizes.copy(),
                load_seconds=self.load_seconds,
            )

    def queue_wait(self, ns: int) -> None:
        """Records one request's time between arrival in the queue and the start of its run."""
        with self._lock:
            self.queue.add(ns)
            self.queue_seconds.observe(ns / 1e9)


# How a generation ended, as vLLM's vllm:request_success_total `finished_reason` label says it.
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class GenerationStats:
    """Per text-generation model: vLLM's request-level metrics (seconds, tokens).

    Updated and read on the event loop only (GenerationScheduler.generate, the metrics
    scrape), so it needs no lock.
    """

    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TIME_TO_FIRST_TOKEN_BUCKETS_S))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(INTER_TOKEN_LATENCY_BUCKETS_S))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS_S))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS_S))
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))

    def first_chunk(self, queue_s: float, ttft_s: float, prompt_tokens: int) -> None:
        """The first tokens of a stream reached it: its wait for a place, its time to first token, its prompt."""
        self.queue_time.observe(queue_s)
        self.time_to_first_token.observe(ttft_s)
        self.prompt_tokens += prompt_tokens

    def tokens(self, count: int, gap_s: float | None) -> None:
        """A chunk of `count` tokens; `gap_s` since the stream's previous chunk (None for the first).

        A chunk that carries several tokens (stream_interval > 1) counts as that many
        inter-token gaps of an equal share of the time, so the histogram's count stays
        the number of tokens after the first, as with one token per chunk.
        """
        self.generation_tokens += count
        if gap_s is not None and count > 0:
            self.inter_token_latency.observe(gap_s / count, count)

    def end(self, reason: str, e2e_s: float) -> None:
        """A stream ended: stop or length (it finished), abort (cancelled, deadline)."""
        self.finished[reason] += 1
        self.e2e_latency.observe(e2e_s)
