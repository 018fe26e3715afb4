"""Metrics as plain values: the families one worker exports, how workers' families add up, and system gauges.

The families carry Triton's names and labels for every model (nv_inference_*), vLLM's for
text-generation models (vllm:*), and ortserve's own histograms and front-end counters. They
are built at scrape time from the statistics the models keep anyway (core.statistics), so a
request pays for metrics only the few additions its statistics already make.

Families travel between workers as JSON (`families_to_json`): one scrape asks every sibling
for its own families and adds them up (`merge`); server-wide gauges (CPU, memory, GPU) are
read once, by the worker that answers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from server.core.histogram import Histogram
from server.core.statistics import FAILURE_REASONS, FINISH_REASONS

Kind = Literal["counter", "gauge", "histogram"]
# How a gauge of several workers becomes one value: sum (requests pending), max (a load time),
# mean (a share of a budget each worker has the same of).
Merge = Literal["sum", "max", "mean"]
Value = float | Histogram

TENSOR_LABELS = ("model", "version")  # Triton's
GENERATION_LABELS = ("model_name", "version")  # vLLM's (as Triton's vLLM backend adds `version`)


@dataclass
class Family:
    """One metric family: its samples by label values (in `labels` order)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    merge: Merge = "sum"
    samples: dict[tuple[str, ...], Value] = field(default_factory=dict)
    # Workers that gave a sample, for a gauge merged as a mean.
    _sources: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)

    def add(self, labels: tuple[str, ...], value: Value) -> None:
        """Adds a sample, or (for another worker's sample with the same labels) merges it in."""
        current = self.samples.get(labels)
        if current is None:
            self.samples[labels] = value.copy() if isinstance(value, Histogram) else value
            self._sources[labels] = 1
            return
        self._sources[labels] += 1
        if isinstance(current, Histogram):
            assert isinstance(value, Histogram)
            current.add(value)
        elif self.merge == "max":
            self.samples[labels] = max(current, float(value))  # type: ignore[arg-type]
        elif self.merge == "mean":
            n = self._sources[labels]
            self.samples[labels] = current + (float(value) - current) / n  # type: ignore[arg-type]
        else:
            self.samples[labels] = current + float(value)  # type: ignore[arg-type]


class RequestCounter:
    """Requests a front end answered, by label values (route or method, status); thread-safe.

    One dict increment under a lock per request: the front ends call `count` once per request.
    """

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_text
        self.labels = labels
        self._counts: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def count(self, *values: str) -> None:
        with self._lock:
            self._counts[values] = self._counts.get(values, 0) + 1

    def family(self) -> Family:
        with self._lock:
            counts = dict(self._counts)
        family = Family(self.name, "counter", self.help, self.labels)
        for key in sorted(counts):
            family.add(key, float(counts[key]))
        return family


HTTP_REQUESTS = "ortserve_http_requests_total"
GRPC_REQUESTS = "ortserve_grpc_requests_total"


def http_counter() -> RequestCounter:
    return RequestCounter(
        HTTP_REQUESTS, "HTTP requests answered, by method, route template and status code", ("method", "route", "code")
    )


def grpc_counter() -> RequestCounter:
    return RequestCounter(GRPC_REQUESTS, "gRPC calls answered, by full method name and status code", ("method", "code"))


# Triton's counters: (name, help, the ModelStats field and what of it).
_TRITON_DURATIONS = (
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds", "success"),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds", "queue"),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds", "compute_input"),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     "compute_infer"),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output duration in microseconds",
     "compute_output"),
)
_HISTOGRAMS = (
    ("ortserve_request_duration_seconds", "Time successful requests spent in the server", "request_seconds"),
    ("ortserve_queue_duration_seconds", "Time requests waited for a model instance", "queue_seconds"),
    ("ortserve_compute_infer_duration_seconds", "Model run time of each request's batch", "compute_infer_seconds"),
    ("ortserve_batch_size", "Batch size (elements) of each model run", "batch_sizes"),
)
_GENERATION_HISTOGRAMS = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds", "time_to_first_token"),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds", "inter_token_latency"),
    ("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds", "e2e_latency"),
    ("vllm:request_queue_time_seconds", "Histogram of time spent waiting for a place in the batch", "queue_time"),
)


def model_families(models: Sequence[Any]) -> list[Family]:
    """The per-model families of one worker's served model versions (Model or EnsembleModel)."""
    counters = {
        name: Family(name, "counter", help_text, TENSOR_LABELS)
        for name, help_text in (
            ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
            ("nv_inference_count", "Number of inferences performed (a batch of n counts n)"),
            ("nv_inference_exec_count", "Number of model executions performed"),
        )
    }
    failure = Family(
        "nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes",
        (*TENSOR_LABELS, "reason"),
    )
    durations = [Family(name, "counter", help_text, TENSOR_LABELS) for name, help_text, _ in _TRITON_DURATIONS]
    pending = Family(
        "nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution",
        TENSOR_LABELS,
    )
    load = Family("nv_model_load_duration_secs", "gauge", "Model load time in seconds", TENSOR_LABELS, merge="max")
    histograms = [Family(name, "histogram", help_text, TENSOR_LABELS) for name, help_text, _ in _HISTOGRAMS]
    generation = _GenerationFamilies()
    for model in models:
        labels = (model.name, str(model.version))
        stats = model.stats.frozen()
        counters["nv_inference_request_success"].add(labels, float(stats.success.count))
        counters["nv_inference_count"].add(labels, float(stats.inference_count))
        counters["nv_inference_exec_count"].add(labels, float(stats.execution_count))
        for reason in FAILURE_REASONS:
            failure.add((*labels, reason), float(stats.failures[reason]))
        for family, (_, _, attribute) in zip(durations, _TRITON_DURATIONS, strict=True):
            family.add(labels, float(getattr(stats, attribute).ns // 1000))
        for family, (_, _, attribute) in zip(histograms, _HISTOGRAMS, strict=True):
            family.add(labels, getattr(stats, attribute))
        load.add(labels, stats.load_seconds)
        generator = getattr(model, "generator", None)
        scheduler = getattr(model, "scheduler", None)
        if generator is not None:
            generation.add(labels, generator)
            pending.add(labels, float(generator.load()[1]))
        else:
            pending.add(labels, float(scheduler.queued) if scheduler is not None else 0.0)
    return [
        counters["nv_inference_request_success"], failure, counters["nv_inference_count"],
        counters["nv_inference_exec_count"], *durations, pending, load, *histograms, *generation.families(),
    ]


class _GenerationFamilies:
    """vLLM's families, filled from each text-generation model's GenerationScheduler."""

    def __init__(self) -> None:
        self.histograms = [
            Family(name, "histogram", help_text, GENERATION_LABELS) for name, help_text, _ in _GENERATION_HISTOGRAMS
        ]
        self.running = Family("vllm:num_requests_running", "gauge", "Number of requests in the batch",
                              GENERATION_LABELS)
        self.waiting = Family("vllm:num_requests_waiting", "gauge", "Number of requests waiting for a place",
                              GENERATION_LABELS)
        self.cache = Family(
            "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage: share of the batch's token budget held (1 = full)",
            GENERATION_LABELS, merge="mean",
        )
        self.prompt = Family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed",
                             GENERATION_LABELS)
        self.generated = Family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed",
                                GENERATION_LABELS)
        self.success = Family(
            "vllm:request_success_total", "counter", "Count of finished requests by finish reason",
            (*GENERATION_LABELS, "finished_reason"),
        )

    def add(self, labels: tuple[str, ...], generator: Any) -> None:
        stats = generator.stats
        for family, (_, _, attribute) in zip(self.histograms, _GENERATION_HISTOGRAMS, strict=True):
            family.add(labels, getattr(stats, attribute))
        running, waiting, cache = generator.load()
        self.running.add(labels, float(running))
        self.waiting.add(labels, float(waiting))
        self.cache.add(labels, cache)
        self.prompt.add(labels, float(stats.prompt_tokens))
        self.generated.add(labels, float(stats.generation_tokens))
        for reason in FINISH_REASONS:
            self.success.add((*labels, reason), float(stats.finished[reason]))

    def families(self) -> list[Family]:
        return [*self.histograms, self.running, self.waiting, self.cache, self.prompt, self.generated, self.success]


def merge(target: list[Family], others: Iterable[Family]) -> None:
    """Adds another worker's families into `target` (same names merge sample by sample)."""
    by_name = {f.name: f for f in target}
    for other in others:
        mine = by_name.get(other.name)
        if mine is None:
            mine = by_name[other.name] = Family(other.name, other.kind, other.help, other.labels, other.merge)
            target.append(mine)
        for labels, value in other.samples.items():
            mine.add(labels, value)


def carried_over(baseline: Sequence[Family], served: set[tuple[str, str]]) -> list[Family]:
    """What a restarted worker adds to its own counters: its predecessor's last counters and histograms.

    Kept: samples of model versions still served (a model unloaded since starts again from
    zero when it comes back, as Triton's do), and those of no model (front-end counts).
    Gauges are never carried: they describe the moment, and the predecessor's are gone.
    """
    kept = []
    for family in baseline:
        if family.kind == "gauge":
            continue
        model_at = next((i for i, n in enumerate(family.labels) if n in ("model", "model_name")), None)
        version_at = family.labels.index("version") if "version" in family.labels else None
        copy = Family(family.name, family.kind, family.help, family.labels, family.merge)
        for labels, value in family.samples.items():
            if model_at is None or version_at is None or (labels[model_at], labels[version_at]) in served:
                copy.add(labels, value)
        kept.append(copy)
    return kept


def families_to_json(families: Sequence[Family]) -> list[dict[str, Any]]:
    """Families as JSON-ready values (for a sibling worker's scrape)."""
    out = []
    for family in families:
        samples: list[Any] = []
        bounds: list[float] = []
        for labels, value in family.samples.items():
            if isinstance(value, Histogram):
                bounds = list(value.bounds)
                samples.append([list(labels), value.counts, value.sum])
            else:
                samples.append([list(labels), value])
        out.append({
            "name": family.name, "kind": family.kind, "help": family.help, "labels": list(family.labels),
            "merge": family.merge, "bounds": bounds, "samples": samples,
        })
    return out


def families_from_json(data: list[dict[str, Any]]) -> list[Family]:
    """The inverse of families_to_json."""
    families = []
    for item in data:
        family = Family(item["name"], item["kind"], item["help"], tuple(item["labels"]), item["merge"])
        for sample in item["samples"]:
            labels = tuple(sample[0])
            if family.kind == "histogram":
                family.add(labels, Histogram(item["bounds"], list(sample[1]), float(sample[2])))
            else:
                family.add(labels, float(sample[1]))
        families.append(family)
    return families


__all__ = [
    "Family", "RequestCounter", "model_families", "merge", "families_to_json", "families_from_json",
    "http_counter", "grpc_counter",
]
