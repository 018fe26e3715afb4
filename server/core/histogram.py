"""Fixed-bucket histograms, cheap enough to update on every request.

Kept as plain lists of integers (not prometheus_client objects) so that a request's
statistics stay one lock and a few additions; the metrics front end turns them into
Prometheus histograms when it is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Request, queue and compute times: 100 microseconds to 10 seconds (seconds).
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Batch sizes of model runs (elements).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# vLLM's (v1) boundaries, so that vLLM dashboards read our histograms with their own buckets.
TIME_TO_FIRST_TOKEN_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)
INTER_TOKEN_LATENCY_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)


class Histogram:
    """Counts of observations per bucket (upper bounds inclusive, as Prometheus's `le`) and their sum.

    `counts` has one more entry than `bounds`: the last counts values above every bound.
    Not thread-safe on its own: callers update it under their statistics lock.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float], counts: list[int] | None = None, total: float = 0.0) -> None:
        self.bounds = tuple(bounds)
        self.counts = counts if counts is not None else [0] * (len(self.bounds) + 1)
        self.sum = total

    @property
    def count(self) -> int:
        """Observations in all."""
        return sum(self.counts)

    def observe(self, value: float, times: int = 1) -> None:
        """Adds `times` observations of `value`."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum)

    def add(self, other: Histogram) -> None:
        """Adds another histogram with the same bounds (another worker's)."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be added")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum

    def cumulative(self) -> list[int]:
        """Prometheus's bucket values: observations at or below each bound, then all of them (+Inf)."""
        total, out = 0, []
        for count in self.counts:
            total += count
            out.append(total)
        return out
