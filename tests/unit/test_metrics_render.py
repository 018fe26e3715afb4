"""The metrics text writer (render), the worker merge and the JSON the workers exchange, without a server."""

from __future__ import annotations

import json
import math

import pytest

from server.core.histogram import Histogram
from server.http.metrics import render
from server.service.metrics import Family, RequestCounter, families_from_json, families_to_json, merge


def lines(*families: Family) -> list[str]:
    return render(families).decode("utf-8").splitlines()


def test_a_family_has_help_type_and_one_line_per_sample() -> None:
    family = Family("nv_inference_count", "counter", "Inferences", ("model", "version"))
    family.add(("digits", "1"), 3.0)
    family.add(("addsub", "2"), 0.0)
    assert lines(family) == [
        "# HELP nv_inference_count Inferences",
        "# TYPE nv_inference_count counter",
        'nv_inference_count{model="digits",version="1"} 3',
        'nv_inference_count{model="addsub",version="2"} 0',
    ]
    assert render([family]).endswith(b"\n")


def test_label_values_escape_backslash_quote_and_newline() -> None:
    family = Family("x", "gauge", "h", ("model",))
    family.add(('a\\b"c\nd',), 1.0)
    assert lines(family)[-1] == 'x{model="a\\\\b\\"c\\nd"} 1'


def test_help_text_escapes_backslash_and_newline() -> None:
    family = Family("x", "gauge", "one\\two\nthree")
    assert lines(family)[0] == "# HELP x one\\\\two\\nthree"


def test_a_family_without_labels_has_no_braces() -> None:
    family = Family("nv_cpu_utilization", "gauge", "CPU")
    family.add((), 0.25)
    assert lines(family)[-1] == "nv_cpu_utilization 0.25"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (float("nan"), "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (7.0, "7"), (-2.0, "-2"), (0.0, "0"),
        (2.5, "2.5"), (0.1, "0.1"), (1e-7, "1e-07"), (123456789012.0, "123456789012"),
        (float(2**53), "9007199254740992.0"),  # beyond exact integers: written as a float
    ],
)
def test_numbers_are_written_as_prometheus_reads_them(value: float, text: str) -> None:
    family = Family("x", "gauge", "h")
    family.add((), value)
    assert lines(family)[-1] == f"x {text}"
    written = lines(family)[-1].split(" ")[1]
    parsed = float(written.replace("+Inf", "inf"))
    assert (math.isnan(parsed) and math.isnan(value)) or parsed == value


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    histogram = Histogram((0.1, 1.0, 5.0))
    for value in (0.05, 0.1, 0.7, 3.0, 3.0, 99.0):  # 0.1 falls in le="0.1": bounds are inclusive
        histogram.observe(value)
    histogram.observe(0.5, times=2)
    family = Family("lat_seconds", "histogram", "h", ("model",))
    family.add(("m",), histogram)
    assert lines(family)[2:] == [
        'lat_seconds_bucket{model="m",le="0.1"} 2',
        'lat_seconds_bucket{model="m",le="1.0"} 5',
        'lat_seconds_bucket{model="m",le="5.0"} 7',
        'lat_seconds_bucket{model="m",le="+Inf"} 8',
        f'lat_seconds_sum{{model="m"}} {0.05 + 0.1 + 0.7 + 3.0 + 3.0 + 99.0 + 1.0!r}',
        'lat_seconds_count{model="m"} 8',
    ]


def test_an_empty_histogram_has_zero_buckets() -> None:
    family = Family("b", "histogram", "h")
    family.add((), Histogram((1, 2)))
    assert lines(family)[2:] == ['b_bucket{le="1.0"} 0', 'b_bucket{le="2.0"} 0', 'b_bucket{le="+Inf"} 0',
                                 "b_sum 0", "b_count 0"]


def worker(success: float, pending: float, load: float, cache: float, observed: list[float]) -> list[Family]:
    """One worker's families: a counter, gauges of each merge rule, a histogram."""
    counter = Family("nv_inference_request_success", "counter", "ok", ("model", "version"))
    counter.add(("m", "1"), float(success))
    gauges = [Family("pending", "gauge", "h", ("model",), merge="sum"),
              Family("load", "gauge", "h", ("model",), merge="max"),
              Family("cache", "gauge", "h", ("model",), merge="mean")]
    for family, value in zip(gauges, (pending, load, cache), strict=True):
        family.add(("m",), float(value))
    histogram = Histogram((1.0, 10.0))
    for value in observed:
        histogram.observe(value)
    latency = Family("lat", "histogram", "h", ("model",))
    latency.add(("m",), histogram)
    return [counter, *gauges, latency]


def samples(families: list[Family]) -> dict[str, object]:
    out: dict[str, object] = {}
    for family in families:
        for labels, value in family.samples.items():
            out[f"{family.name}{labels}"] = (value.counts, value.sum) if isinstance(value, Histogram) else value
    return out


def test_merge_adds_counters_and_histograms_and_gauges_by_their_rule() -> None:
    merged = worker(5, 1, 2.0, 0.2, [0.5, 20.0])
    merge(merged, worker(7, 2, 3.5, 0.4, [3.0]))
    merge(merged, worker(1, 0, 1.0, 0.6, []))
    assert samples(merged) == {
        "nv_inference_request_success('m', '1')": 13.0,
        "pending('m',)": 3.0,
        "load('m',)": 3.5,
        "cache('m',)": pytest.approx(0.4),  # the mean of three workers
        "lat('m',)": ([1, 1, 1], 23.5),
    }


def test_merge_keeps_series_and_families_only_one_worker_has() -> None:
    mine = worker(5, 1, 2.0, 0.2, [])
    other = worker(7, 2, 3.5, 0.4, [])
    other[0].add(("n", "1"), 4.0)
    extra = Family("ortserve_grpc_requests_total", "counter", "g", ("method", "code"))
    extra.add(("/x", "OK"), 2.0)
    merge(mine, [*other, extra])
    assert mine[0].samples == {("m", "1"): 12.0, ("n", "1"): 4.0}
    assert mine[-1].name == "ortserve_grpc_requests_total" and mine[-1].samples == {("/x", "OK"): 2.0}


def test_merging_leaves_the_other_workers_histograms_alone() -> None:
    mine, other = worker(0, 0, 0, 0, [0.5]), worker(0, 0, 0, 0, [2.0])
    merge(mine, other)
    merge(mine, other)
    assert samples(other)["lat('m',)"] == ([0, 1, 0], 2.0)
    assert samples(mine)["lat('m',)"] == ([1, 2, 0], 4.5)


def test_histograms_with_other_buckets_do_not_add() -> None:
    with pytest.raises(ValueError):
        Histogram((1.0,)).add(Histogram((2.0,)))


def test_json_round_trip_gives_the_same_families_and_text() -> None:
    families = worker(5, 1, 2.0, 0.2, [0.5, 20.0])
    counter = RequestCounter("ortserve_http_requests_total", "h", ("method", "route", "code"))
    counter.count("GET", "/v2/health/live", "200")
    counter.count("POST", "/v2/models/{name}/infer", "404")
    counter.count("GET", "/v2/health/live", "200")
    families.append(counter.family())
    families.append(Family("empty", "histogram", "no samples yet", ("model",)))
    wire = json.loads(json.dumps(families_to_json(families)))  # as it travels between workers
    back = families_from_json(wire)
    assert render(back) == render(families)
    assert [(f.name, f.kind, f.help, f.labels, f.merge) for f in back] == [
        (f.name, f.kind, f.help, f.labels, f.merge) for f in families]
    assert samples(back) == samples(families)
    # And the round trip merges as the original would.
    twice = families_from_json(wire)
    merge(twice, families_from_json(wire))
    assert twice[0].samples == {("m", "1"): 10.0}
    assert twice[-2].samples[("GET", "/v2/health/live", "200")] == 4.0


def test_request_counter_counts_each_key_once_per_call() -> None:
    counter = RequestCounter("c", "h", ("method", "code"))
    for _ in range(3):
        counter.count("/a", "OK")
    counter.count("/a", "NOT_FOUND")
    family = counter.family()
    assert family.kind == "counter"
    assert family.samples == {("/a", "NOT_FOUND"): 1.0, ("/a", "OK"): 3.0}
    assert RequestCounter("c", "h", ("method",)).family().samples == {}
