"""Statistics as plain values: one model version's counters, and the sum over workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.core.statistics import Duration

# Per-request durations that ortserve fills (Triton's InferStatistics fields), and the per-batch-size ones.
REQUEST_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


def _durations(names: tuple[str, ...]) -> dict[str, Duration]:
    return {name: Duration() for name in names}


@dataclass
class VersionStatistics:
    """Triton's ModelStatistics of one model version, as plain values.

    Attributes:
        requests: Per-request durations by REQUEST_DURATIONS name.
        batches: Per run size, the BATCH_DURATIONS of the runs of that size.
    """

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    requests: dict[str, Duration] = field(default_factory=lambda: _durations(REQUEST_DURATIONS))
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Any) -> VersionStatistics:
        """A copy of a served model's counters (Model or EnsembleModel: both carry `stats`).

        Taken from one snapshot under the statistics lock, so the counters agree with each other.
        """
        stats = model.stats.frozen()
        copy = cls(
            name=model.name,
            version=str(model.version),
            last_inference_ms=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
        )
        for name in REQUEST_DURATIONS:
            duration = getattr(stats, name)
            copy.requests[name] = Duration(duration.count, duration.ns)
        for size in sorted(stats.batch_stats):
            per_batch = stats.batch_stats[size]
            copy.batches[size] = {
                name: Duration(getattr(per_batch, name).count, getattr(per_batch, name).ns) for name in BATCH_DURATIONS
            }
        return copy

    def add(self, other: VersionStatistics) -> None:
        """Adds another worker's counters of the same model version."""
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        for name, duration in other.requests.items():
            self.requests.setdefault(name, Duration()).add(duration.ns, duration.count)
        for size, durations in other.batches.items():
            mine = self.batches.setdefault(size, _durations(BATCH_DURATIONS))
            for name, duration in durations.items():
                mine.setdefault(name, Duration()).add(duration.ns, duration.count)
        self.batches = dict(sorted(self.batches.items()))


def merge_statistics(target: list[VersionStatistics], other: list[VersionStatistics]) -> None:
    """Adds another worker's statistics into `target`, model version by model version.

    A version only the other worker serves is appended (as Triton lists it: after the rest).
    """
    by_key = {(s.name, s.version): s for s in target}
    for stats in other:
        mine = by_key.get((stats.name, stats.version))
        if mine is None:
            target.append(stats)
            by_key[(stats.name, stats.version)] = stats
        else:
            mine.add(stats)
