"""Prometheus metrics (issue 12) through real clients against real servers.

Every count is checked as an exact difference between two scrapes around the test's own
traffic (the session server is shared), or as an absolute value on a server of this module's
own. States such as "the instance is busy" or "a request waits in the queue" are held with
the test gates (tests/gate.py) and observed through the metrics themselves, never by timing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from exporters.export import ExportSpec
from exporters.graphs import IR_VERSION, OPSET, export_graph, identity_model
from server.core import histogram as buckets
from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc
from tests.conftest import ROOT, ServerProcess
from tests.gate import WAIT_S, Gate, gate_config, wait_until

# A generous bound for states that depend on another process (a restart, a cancel reaching the server).
SLOW_WAIT_S = 120.0

# ---------------------------------------------------------------------------------------------------------------
# The exposition format, parsed here (prometheus_client's parser would add a dependency for ~40 lines).


Labels = tuple[tuple[str, str], ...]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_labels(text: str) -> Labels:
    """`{a="x",b="y"}` -> (("a", "x"), ("b", "y")), sorted by name; raises on anything malformed."""
    inner, pairs, pos = text[1:-1], [], 0
    while pos < len(inner):
        match = _LABEL.match(inner, pos)
        assert match is not None, f"bad labels {text!r}"
        pairs.append((match.group(1), _unescape(match.group(2))))
        pos = match.end()
    return tuple(sorted(pairs))


@dataclass
class Exposition:
    """One scrape: family types, samples keyed by (sample name, labels), and any series seen twice."""

    types: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)
    duplicates: list[tuple[str, Labels]] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample with exactly these labels."""
        return self.samples[(name, tuple(sorted(labels.items())))]

    def series(self, name: str, **subset: str) -> dict[Labels, float]:
        """Every sample of `name` whose labels include `subset`."""
        want = set(subset.items())
        return {labels: v for (n, labels), v in self.samples.items() if n == name and want <= set(labels)}

    def family_of(self, sample: str) -> str:
        """The family a sample line belongs to (a histogram's `_bucket`/`_sum`/`_count` lines)."""
        if sample in self.types:
            return sample
        for suffix in ("_bucket", "_sum", "_count"):
            base = sample.removesuffix(suffix)
            if base != sample and self.types.get(base) == "histogram":
                return base
        raise AssertionError(f"sample {sample} has no # TYPE line")


def parse(text: str) -> Exposition:
    """Parses Prometheus's text format 0.0.4 strictly enough to catch a malformed line."""
    out = Exposition()
    for line in text.splitlines():
        if not line or line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in out.types, f"two TYPE lines for {name}"
            out.types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match is not None, f"malformed line {line!r}"
        key = (match.group(1), parse_labels(match.group(2)) if match.group(2) else ())
        if key in out.samples:
            out.duplicates.append(key)
        out.samples[key] = float(match.group(3))
        out.family_of(key[0])
    return out


def scrape(url: str) -> Exposition:
    response = httpx.get(url, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    exposition = parse(response.text)
    assert not exposition.duplicates, exposition.duplicates
    return exposition


def wait_for_metric(
    url: str, predicate: Callable[[Exposition], bool], what: str, timeout_s: float = WAIT_S
) -> Exposition:
    """Scrapes until `predicate(exposition)` holds; returns that scrape."""
    seen: list[Exposition] = []

    def check() -> bool:
        seen.append(scrape(url))
        return bool(predicate(seen[-1]))

    wait_until(check, what, timeout_s)
    return seen[-1]


def model_value(exp: Exposition, name: str, model: str, **labels: str) -> float:
    return exp.value(name, model=model, version="1", **labels)


def failures(exp: Exposition, model: str) -> dict[str, float]:
    return {r: model_value(exp, "nv_inference_request_failure", model, reason=r)
            for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER")}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def bucket_bounds(exp: Exposition, name: str, **labels: str) -> list[float]:
    """A histogram series' `le` bounds in ascending order (+Inf last)."""
    want = set(labels.items())
    bounds = [float(dict(lab)["le"]) for lab in exp.series(f"{name}_bucket") if want <= set(lab)]
    return sorted(bounds)


# ---------------------------------------------------------------------------------------------------------------
# This module's own repository and servers.

DECODER = "bytes_decoder"
GATED_DECODER = "bytes_decoder_gated"
FAILING = "reshaper"  # runs for an even batch, fails in ONNX Runtime for an odd one
FRESH = "fresh"  # never sent anything: its families must read zero


def reshaper_model() -> onnx.ModelProto:
    """x [batch, 6] -> y [batch, 6] through a Reshape to [-1, 4] and back.

    Valid for the config (any batch size passes validation), but ONNX Runtime cannot reshape
    6 * batch elements to rows of 4 when the batch is odd: a model run that fails (BACKEND).
    """
    nodes = [
        helper.make_node("Constant", [], ["rows4"], value=helper.make_tensor("r", TensorProto.INT64, [2], [-1, 4])),
        helper.make_node("Reshape", ["x", "rows4"], ["mid"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Reshape", ["mid", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "reshaper",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def copy_decoder(repo: Path, name: str, extra: str = "") -> None:
    target = repo / name
    shutil.copytree(ROOT / "model_repository" / DECODER, target)
    config = (target / "config.pbtxt").read_text().replace(f'name: "{DECODER}"', f'name: "{name}"')
    (target / "config.pbtxt").write_text(config + "\n" + extra + "\n")


def small_repository(root: Path, *names: str) -> Path:
    """Identity models [batch, 2] FP32, one per name: cheap to export, nothing shared with other tests."""
    for name in names:
        export_graph(identity_model(["FP32"], ["batch", 2]), ExportSpec([], [], max_batch_size=8), root, name)
    return root


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One worker serving the decoders, the failing model and a fresh one; only this module talks to it."""
    repo = small_repository(tmp_path_factory.mktemp("metrics_repo"), FRESH)
    export_graph(reshaper_model(), ExportSpec([], [], max_batch_size=8), repo, FAILING)
    copy_decoder(repo, DECODER)
    gate_dir = repo.parent / f"{repo.name}-gate"
    gate = Gate(gate_dir)  # the directory must exist when the model loads
    copy_decoder(repo, GATED_DECODER, gate_config(gate_dir))
    server = ServerProcess(repo, tmp_path_factory.mktemp("metrics_server"))
    server.gate = gate  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.log()


# ---------------------------------------------------------------------------------------------------------------
# 1. Names, types, labels and histogram shapes.

TRITON_COUNTERS = (
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
)
MODEL_GAUGES = ("nv_inference_pending_request_count", "nv_model_load_duration_secs")
SYSTEM_GAUGES = ("nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes")
OWN_HISTOGRAMS = ("ortserve_request_duration_seconds", "ortserve_queue_duration_seconds",
                  "ortserve_compute_infer_duration_seconds", "ortserve_batch_size")
VLLM_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": (buckets.TIME_TO_FIRST_TOKEN_BUCKETS_S, 0.001, 2560.0),
    "vllm:inter_token_latency_seconds": (buckets.INTER_TOKEN_LATENCY_BUCKETS_S, 0.01, 80.0),
    "vllm:e2e_request_latency_seconds": (buckets.REQUEST_LATENCY_BUCKETS_S, 0.3, 7680.0),
    "vllm:request_queue_time_seconds": (buckets.REQUEST_LATENCY_BUCKETS_S, 0.3, 7680.0),
}
VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
VLLM_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total")
FRONT_COUNTERS = {"ortserve_http_requests_total": {"method", "route", "code"},
                  "ortserve_grpc_requests_total": {"method", "code"}}
EVERY_FAMILY = (*TRITON_COUNTERS, *MODEL_GAUGES, *SYSTEM_GAUGES, *OWN_HISTOGRAMS, *VLLM_HISTOGRAMS, *VLLM_GAUGES,
                *VLLM_COUNTERS, *FRONT_COUNTERS)


def label_names(exp: Exposition, family: str) -> set[str]:
    names = {n for (sample, labels) in exp.samples for n, _ in labels if exp.family_of(sample) == family}
    return names - {"le"}


def test_families_have_the_exact_names_types_and_labels(own: ServerProcess) -> None:
    # One request to the front ends first, so their counters have a series to show labels on.
    httpx.get(f"{own.http_url}/v2/health/ready", timeout=WAIT_S)
    grpcclient.InferenceServerClient(own.address).is_server_live()
    exp = scrape(own.metrics_url)
    expected_types = {
        **dict.fromkeys(TRITON_COUNTERS, "counter"), **dict.fromkeys(MODEL_GAUGES + SYSTEM_GAUGES, "gauge"),
        **dict.fromkeys((*OWN_HISTOGRAMS, *VLLM_HISTOGRAMS), "histogram"), **dict.fromkeys(VLLM_GAUGES, "gauge"),
        **dict.fromkeys((*VLLM_COUNTERS, *FRONT_COUNTERS), "counter"),
    }
    assert {name: exp.types.get(name) for name in expected_types} == expected_types
    assert not [n for n in (*TRITON_COUNTERS, *MODEL_GAUGES, *OWN_HISTOGRAMS) if "_total" in n]
    assert not [n for n in exp.types if n.startswith("nv_") and n.endswith("_total")]
    for name in (*TRITON_COUNTERS, *MODEL_GAUGES, *OWN_HISTOGRAMS):
        extra = {"reason"} if name == "nv_inference_request_failure" else set()
        assert label_names(exp, name) == {"model", "version"} | extra, name
    for name in SYSTEM_GAUGES:
        assert list(exp.series(name)) == [()], name
    for name in (*VLLM_HISTOGRAMS, *VLLM_GAUGES, "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert label_names(exp, name) == {"model_name", "version"}, name
    assert label_names(exp, "vllm:request_success_total") == {"model_name", "version", "finished_reason"}
    for name, labels in FRONT_COUNTERS.items():
        assert label_names(exp, name) == labels, name
    # vLLM's families only for the text-generation models.
    assert {dict(lab)["model_name"] for lab in exp.series("vllm:num_requests_running")} == {DECODER, GATED_DECODER}


def test_a_fresh_model_shows_every_failure_reason_at_zero(own: ServerProcess) -> None:
    exp = scrape(own.metrics_url)
    assert failures(exp, FRESH) == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 0}
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_pending_request_count"):
        assert model_value(exp, name, FRESH) == 0, name
    assert model_value(exp, "nv_model_load_duration_secs", FRESH) > 0


def test_histograms_have_their_buckets_and_are_cumulative(own: ServerProcess) -> None:
    exp = scrape(own.metrics_url)
    for name in OWN_HISTOGRAMS[:3]:
        bounds = bucket_bounds(exp, name, model=FRESH)
        assert bounds == [*buckets.LATENCY_BUCKETS_S, float("inf")], name
        assert (bounds[0], bounds[-2]) == (0.0001, 10.0)
    assert bucket_bounds(exp, "ortserve_batch_size", model=FRESH) == [*buckets.BATCH_SIZE_BUCKETS, float("inf")]
    for name, (constant, first, last) in VLLM_HISTOGRAMS.items():
        bounds = bucket_bounds(exp, name, model_name=DECODER)
        assert bounds == [*constant, float("inf")], name
        assert (bounds[0], bounds[-2]) == (first, last), name
    for name, kind in exp.types.items():
        if kind == "histogram":
            assert_histograms_consistent(exp, name)


def assert_histograms_consistent(exp: Exposition, name: str) -> None:
    """Every series of histogram `name`: buckets non-decreasing with `le`, and `_count` == the +Inf bucket."""
    by_series: dict[Labels, list[tuple[float, float]]] = {}
    for labels, value in exp.series(f"{name}_bucket").items():
        rest = tuple(p for p in labels if p[0] != "le")
        by_series.setdefault(rest, []).append((float(dict(labels)["le"]), value))
    assert by_series, name
    for rest, points in by_series.items():
        values = [v for _, v in sorted(points)]
        assert values == sorted(values), (name, rest, values)
        assert sorted(points)[-1][0] == float("inf")
        assert exp.samples[(f"{name}_count", rest)] == values[-1], (name, rest)
        assert (f"{name}_sum", rest) in exp.samples


# ---------------------------------------------------------------------------------------------------------------
# 2. Successful requests move the counters by exactly their number (shared server: differences only).


def digits_input(rows: int, module: Any) -> Any:
    tensor = module.InferInput("image", [rows, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.full((rows, 1, 8, 8), 3.0, np.float32))
    return tensor


def success_counts(exp: Exposition, model: str) -> dict[str, float]:
    counts = {name: model_value(exp, name, model) for name in
              ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")}
    for name in OWN_HISTOGRAMS:
        counts[f"{name}_count"] = model_value(exp, f"{name}_count", model)
    counts["ortserve_batch_size_sum"] = model_value(exp, "ortserve_batch_size_sum", model)
    counts.update(failures(exp, model))
    return counts


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_n_requests_move_the_counts_by_exactly_n(server: ServerProcess, protocol: str) -> None:
    sizes = [1, 2, 3, 1, 4]
    before = scrape(server.metrics_url)
    if protocol == "grpc":
        client: Any = grpcclient.InferenceServerClient(server.address)
        for rows in sizes:
            client.infer("digits", [digits_input(rows, grpcclient)], client_timeout=WAIT_S)
    else:
        client = httpclient.InferenceServerClient(server.http_address, network_timeout=WAIT_S)
        for rows in sizes:
            client.infer("digits", [digits_input(rows, httpclient)])
    client.close()
    after = scrape(server.metrics_url)
    moved = delta(success_counts(after, "digits"), success_counts(before, "digits"))
    n = len(sizes)
    assert moved == {
        "nv_inference_request_success": n, "nv_inference_count": sum(sizes),
        # One at a time: each request is a run of its own.
        "nv_inference_exec_count": n, "ortserve_batch_size_count": n, "ortserve_batch_size_sum": sum(sizes),
        "ortserve_request_duration_seconds_count": n, "ortserve_queue_duration_seconds_count": n,
        "ortserve_compute_infer_duration_seconds_count": n,
        "REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 0,
    }
    for name in ("nv_inference_request_duration_us", "nv_inference_compute_infer_duration_us"):
        assert model_value(after, name, "digits") > model_value(before, name, "digits"), name
    assert model_value(after, "ortserve_request_duration_seconds_sum", "digits") > model_value(
        before, "ortserve_request_duration_seconds_sum", "digits")


# ---------------------------------------------------------------------------------------------------------------
# 3 and 4. Failures by reason, and the pending gauge, on the gated models of the shared server.


def gated_request(rows: int, model: str = "gated_batched", **params: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 512])
    request.raw_input_contents.append(np.full((rows, 512), 0.01, np.float32).tobytes())
    for key, value in params.items():
        request.parameters[key].int64_param = value
    return request


def pending(url: str, model: str) -> float:
    return model_value(scrape(url), "nv_inference_pending_request_count", model)


def wait_pending(url: str, model: str, count: int) -> None:
    wait_until(lambda: pending(url, model) == count, f"{model}'s pending gauge to read {count}")


def occupy(stub: Any, gate: Gate, model: str = "gated_batched") -> tuple[Any, str]:
    """Starts a request and waits until its run holds the (only) instance at the gate."""
    seen = len(gate.entered())
    running = stub.ModelInfer.future(gated_request(2, model), timeout=WAIT_S)
    return running, gate.wait_entered(seen)


def assert_serves(stub: Any, model: str = "gated_batched") -> None:
    response = stub.ModelInfer(gated_request(1, model), timeout=WAIT_S)
    assert list(response.outputs[0].shape) == [1, 512]


def test_rejected_counts_queue_full_and_queue_timeout(server: ServerProcess, stub: Any, repository: Any) -> None:
    gate: Gate = repository.gates["gated_batched"]
    before = scrape(server.metrics_url)
    with gate.held():
        running, run = occupy(stub, gate)
        # The instance is held and the queue empty: a 20 ms queue timeout expires in the queue.
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(gated_request(1, timeout=20_000), timeout=WAIT_S)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_pending(server.metrics_url, "gated_batched", 0)
        queued = stub.ModelInfer.future(gated_request(3), timeout=WAIT_S)
        wait_pending(server.metrics_url, "gated_batched", 1)  # the one place is taken
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(gated_request(1), timeout=WAIT_S)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.release(run)
        running.result()
    queued.result()
    assert_serves(stub)
    after = scrape(server.metrics_url)
    assert delta(failures(after, "gated_batched"), failures(before, "gated_batched")) == {
        "REJECTED": 2, "CANCELED": 0, "BACKEND": 0, "OTHER": 0}
    assert model_value(after, "nv_inference_request_success", "gated_batched") - model_value(
        before, "nv_inference_request_success", "gated_batched") == 3
    assert model_value(after, "nv_inference_pending_request_count", "gated_batched") == 0


def test_canceled_counts_requests_the_client_cancelled_queued_and_running(
    server: ServerProcess, stub: Any, repository: Any
) -> None:
    gate: Gate = repository.gates["gated_batched"]
    url = server.metrics_url
    before = failures(scrape(url), "gated_batched")

    def moved() -> dict[str, float]:
        return delta(failures(scrape(url), "gated_batched"), before)

    with gate.held():
        running, run = occupy(stub, gate)
        queued = stub.ModelInfer.future(gated_request(5), timeout=WAIT_S)
        wait_pending(url, "gated_batched", 1)
        assert queued.cancel()
        wait_until(lambda: moved()["CANCELED"] == 1, "the queued request's cancel to be counted", SLOW_WAIT_S)
        wait_pending(url, "gated_batched", 0)
        assert running.cancel()  # its run is held at the gate
        wait_until(lambda: moved()["CANCELED"] == 2, "the running request's cancel to be counted", SLOW_WAIT_S)
        gate.release(run)
    assert_serves(stub)
    assert moved() == {"REJECTED": 0, "CANCELED": 2, "BACKEND": 0, "OTHER": 0}


def test_other_counts_invalid_inputs(server: ServerProcess, stub: Any) -> None:
    before = scrape(server.metrics_url)
    bad_shape = pb.ModelInferRequest(model_name="digits")
    bad_shape.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 9])
    bad_shape.raw_input_contents.append(np.zeros(72, np.float32).tobytes())
    bad_type = pb.ModelInferRequest(model_name="digits")
    bad_type.inputs.add(name="image", datatype="INT32", shape=[1, 1, 8, 8])
    bad_type.raw_input_contents.append(np.zeros(64, np.int32).tobytes())
    for request in (bad_shape, bad_type):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=WAIT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 9], "data": [0.0] * 72}]}
    response = httpx.post(f"{server.http_url}/v2/models/digits/infer", json=body, timeout=WAIT_S)
    assert response.status_code == 400, response.text
    client = grpcclient.InferenceServerClient(server.address)
    client.infer("digits", [digits_input(1, grpcclient)], client_timeout=WAIT_S)  # still serving
    after = scrape(server.metrics_url)
    assert delta(failures(after, "digits"), failures(before, "digits")) == {
        "REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 3}
    assert model_value(after, "nv_inference_request_success", "digits") - model_value(
        before, "nv_inference_request_success", "digits") == 1


def test_backend_counts_model_runs_that_fail(own: ServerProcess) -> None:
    before = scrape(own.metrics_url)
    client = grpcclient.InferenceServerClient(own.address)

    def tensor(rows: int) -> grpcclient.InferInput:
        value = grpcclient.InferInput("x", [rows, 6], "FP32")
        value.set_data_from_numpy(np.ones((rows, 6), np.float32))
        return value

    with pytest.raises(Exception) as err:
        client.infer(FAILING, [tensor(1)], client_timeout=WAIT_S)
    assert "StatusCode.INTERNAL" in str(err.value), err.value
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 6], "data": [1.0] * 18}]}
    response = httpx.post(f"{own.http_url}/v2/models/{FAILING}/infer", json=body, timeout=WAIT_S)
    assert response.status_code == 500, response.text
    result = client.infer(FAILING, [tensor(2)], client_timeout=WAIT_S)  # an even batch runs
    np.testing.assert_array_equal(result.as_numpy("y"), np.ones((2, 6), np.float32))
    after = scrape(own.metrics_url)
    assert delta(failures(after, FAILING), failures(before, FAILING)) == {
        "REJECTED": 0, "CANCELED": 0, "BACKEND": 2, "OTHER": 0}
    assert model_value(after, "nv_inference_request_success", FAILING) - model_value(
        before, "nv_inference_request_success", FAILING) == 1


def test_pending_gauge_shows_the_queued_requests(server: ServerProcess, stub: Any, repository: Any) -> None:
    gate: Gate = repository.gates["gated_pair"]
    url = server.metrics_url
    assert pending(url, "gated_pair") == 0
    with gate.held():
        running, run = occupy(stub, gate, "gated_pair")
        wait_pending(url, "gated_pair", 0)  # a running request is not pending
        queued = [stub.ModelInfer.future(gated_request(1, "gated_pair"), timeout=WAIT_S) for _ in range(2)]
        wait_pending(url, "gated_pair", 2)
        gate.release(run)
        running.result()
    for future in queued:
        future.result()
    wait_pending(url, "gated_pair", 0)


# ---------------------------------------------------------------------------------------------------------------
# 5. vLLM's families for text generation (this module's own server).


def generation_counts(exp: Exposition, model: str) -> dict[str, float]:
    counts = {name: exp.value(name, model_name=model, version="1")
              for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")}
    for name in VLLM_HISTOGRAMS:
        counts[name] = exp.value(f"{name}_count", model_name=model, version="1")
    for reason in ("stop", "length", "abort"):
        counts[reason] = exp.value("vllm:request_success_total", model_name=model, version="1",
                                   finished_reason=reason)
    counts["success"] = model_value(exp, "nv_inference_request_success", model)
    return counts


@dataclass
class Usage:
    prompt: int
    completion: int
    finish: str


def openai_stream(client: openai.OpenAI, **kwargs: Any) -> Usage:
    """A streamed completion (SSE) with its usage chunk; returns the usage and finish reason."""
    chunks = list(client.completions.create(
        model=DECODER, stream=True, stream_options={"include_usage": True}, temperature=0, **kwargs))
    usage = chunks[-1].usage
    assert usage is not None
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return Usage(usage.prompt_tokens, usage.completion_tokens, finish)


def grpc_generate(address: str, **fields: Any) -> Usage:
    with grpc.insecure_channel(address) as channel:
        responses = list(gen_grpc.TextGenerationStub(channel).Generate(
            gen_pb.GenerateRequest(model=DECODER, temperature=0, **fields), timeout=WAIT_S))
    last = responses[-1]
    return Usage(last.prompt_tokens, last.completion_tokens, last.finish_reason)


def test_generation_counts_tokens_and_finish_reasons(own: ServerProcess) -> None:
    before = scrape(own.metrics_url)
    with openai.OpenAI(base_url=f"{own.http_url}/v1", api_key="unused", max_retries=0, timeout=WAIT_S) as client:
        greedy = client.completions.create(model=DECODER, prompt="def ", max_tokens=20, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert greedy.usage is not None
        stop = greedy.choices[0].text[5:7]
        usages = [
            Usage(greedy.usage.prompt_tokens, greedy.usage.completion_tokens, greedy.choices[0].finish_reason),
            openai_stream(client, prompt="def ", max_tokens=9, extra_body={"ignore_eos": True}),
            openai_stream(client, prompt="def ", max_tokens=20, stop=[stop], extra_body={"ignore_eos": True}),
        ]
    usages.append(grpc_generate(own.address, prompt="x = ", max_tokens=6, ignore_eos=True))
    assert [u.finish for u in usages] == ["length", "length", "stop", "length"]
    after = scrape(own.metrics_url)
    n = len(usages)
    moved = delta(generation_counts(after, DECODER), generation_counts(before, DECODER))
    assert moved == {
        "vllm:prompt_tokens_total": sum(u.prompt for u in usages),
        "vllm:generation_tokens_total": sum(u.completion for u in usages),
        **dict.fromkeys(VLLM_HISTOGRAMS, n),
        # The first token of each stream has no gap before it.
        "vllm:inter_token_latency_seconds": sum(u.completion - 1 for u in usages),
        "stop": 1, "length": 3, "abort": 0, "success": n,
    }
    for name in VLLM_GAUGES:
        assert after.value(name, model_name=DECODER, version="1") == 0, name


def test_a_cancelled_stream_counts_as_abort(own: ServerProcess) -> None:
    gate: Gate = own.gate  # type: ignore[attr-defined]
    url = own.metrics_url
    before = scrape(url)
    request = gen_pb.GenerateRequest(model=GATED_DECODER, prompt="a", max_tokens=200, ignore_eos=True, temperature=0)
    with grpc.insecure_channel(own.address) as channel, gate.held():
        seen = len(gate.entered())
        call = gen_grpc.TextGenerationStub(channel).Generate(request, timeout=WAIT_S)
        received: list[Any] = []
        reader = threading.Thread(target=lambda: received.append(next(call)))
        reader.start()
        for _ in range(2):  # the prefill run, then the first decode step: the first tokens go out after them
            gate.release(gate.wait_entered(seen))
            seen += 1
        held = gate.wait_entered(seen)  # the next decode step, held: the stream cannot finish by itself
        reader.join(WAIT_S)
        assert received and received[0].token_ids
        running = scrape(url)
        assert running.value("vllm:num_requests_running", model_name=GATED_DECODER, version="1") == 1
        assert running.value("vllm:kv_cache_usage_perc", model_name=GATED_DECODER, version="1") > 0
        call.cancel()
        after = wait_for_metric(
            url, lambda e: generation_counts(e, GATED_DECODER)["abort"] > generation_counts(before, GATED_DECODER)[
                "abort"], "the cancelled stream to count as abort", SLOW_WAIT_S)
        gate.release(held)
    moved = delta(generation_counts(after, GATED_DECODER), generation_counts(before, GATED_DECODER))
    assert (moved["abort"], moved["stop"], moved["length"], moved["success"]) == (1, 0, 0, 0)
    assert moved["vllm:e2e_request_latency_seconds"] == 1
    assert moved["vllm:time_to_first_token_seconds"] == 1
    assert moved["vllm:generation_tokens_total"] >= len(received[0].token_ids)
    assert delta(failures(after, GATED_DECODER), failures(before, GATED_DECODER))["CANCELED"] == 1
    wait_for_metric(url, lambda e: e.value("vllm:num_requests_running", model_name=GATED_DECODER, version="1") == 0,
                    "the aborted stream to leave the batch")


# ---------------------------------------------------------------------------------------------------------------
# 6. The front ends' request counters and the metrics port's own routes.


def http_count(exp: Exposition, method: str, route: str, code: str) -> float:
    return exp.samples.get(("ortserve_http_requests_total", (("code", code), ("method", method), ("route", route))), 0)


def grpc_count(exp: Exposition, method: str, code: str) -> float:
    return exp.samples.get(("ortserve_grpc_requests_total", (("code", code), ("method", method))), 0)


INFER_ROUTE = "/v2/models/{name}/infer"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def test_http_and_grpc_requests_are_counted_by_route_template_and_status(server: ServerProcess, stub: Any) -> None:
    before = scrape(server.metrics_url)
    for name in ("nope", "nada"):
        response = httpx.post(f"{server.http_url}/v2/models/{name}/infer", json={"inputs": []}, timeout=WAIT_S)
        assert response.status_code == 404
    assert httpx.get(f"{server.http_url}/no/such/path", timeout=WAIT_S).status_code == 404
    assert httpx.get(f"{server.http_url}/v2/health/live", timeout=WAIT_S).status_code == 200
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), timeout=WAIT_S)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stub.ServerLive(pb.ServerLiveRequest(), timeout=WAIT_S)
    after = scrape(server.metrics_url)

    def moved(count: Callable[..., float], *key: str) -> float:
        return count(after, *key) - count(before, *key)

    assert moved(http_count, "POST", INFER_ROUTE, "404") == 2
    assert moved(http_count, "GET", "unmatched", "404") == 1
    assert moved(http_count, "GET", "/v2/health/live", "200") == 1
    assert moved(grpc_count, MODEL_INFER, "NOT_FOUND") == 1
    assert moved(grpc_count, "/inference.GRPCInferenceService/ServerLive", "OK") == 1
    routes = {dict(labels)["route"] for labels in after.series("ortserve_http_requests_total")}
    assert not [r for r in routes if "nope" in r or "nada" in r or "/no/such" in r], routes


def test_metrics_port_answers_only_get_metrics_and_the_http_port_serves_the_same(server: ServerProcess) -> None:
    base = server.metrics_url.removesuffix("/metrics")
    assert httpx.get(f"{base}/", timeout=WAIT_S).status_code == 404
    assert httpx.get(f"{base}/v2/health/live", timeout=WAIT_S).status_code == 404
    assert httpx.post(server.metrics_url, timeout=WAIT_S).status_code == 405
    on_metrics_port = scrape(server.metrics_url)
    on_http_port = scrape(f"{server.http_url}/metrics")
    assert on_http_port.types == on_metrics_port.types
    assert set(EVERY_FAMILY) <= set(on_http_port.types)


# ---------------------------------------------------------------------------------------------------------------
# 7 and 9. Two workers: one scrape adds up both; a killed worker; scrapes do not grow anything.

COUNTED = "counted"  # only test_two_workers_add_up_in_one_scrape sends it requests
SPARE = "spare"  # only the killed-worker test


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = small_repository(tmp_path_factory.mktemp("metrics_workers_repo"), COUNTED, SPARE)
    server = ServerProcess(repo, tmp_path_factory.mktemp("metrics_workers"), "--workers", "2")
    yield server
    assert server.stop() == 0, server.log()


def identity_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="in_fp32", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
    return request


def infer_on_fresh_connection(address: str, model: str) -> str:
    """One request over a new connection (so the kernel may pick either worker); returns the worker that served it.

    ServerMetadata names the worker; ModelInfer then goes over the same connection, so to the same worker.
    """
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=WAIT_S)
        stub.ModelInfer(identity_request(model), timeout=WAIT_S)
    return str(dict(call.initial_metadata())["ortserve-worker"])


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """Each worker's latest pid, from its "worker N (pid P) serving" log line."""
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+) \(pid (\d+)\) serving", server.log())}


def test_two_workers_add_up_in_one_scrape(workers: ServerProcess) -> None:
    served = [infer_on_fresh_connection(workers.address, COUNTED) for _ in range(24)]
    for url in (workers.metrics_url, f"{workers.http_url}/metrics"):
        for _ in range(4):  # whichever worker answers the scrape
            exp = scrape(url)
            assert model_value(exp, "nv_inference_request_success", COUNTED) == len(served)
            assert model_value(exp, "nv_inference_count", COUNTED) == len(served)
            assert model_value(exp, "ortserve_request_duration_seconds_count", COUNTED) == len(served)
            for name in SYSTEM_GAUGES:
                assert len(exp.series(name)) == 1, name
            assert len(exp.series("nv_inference_request_success", model=COUNTED)) == 1


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]


def peer_dir(worker_pid: int) -> Path:
    """The supervisor's private directory (under the system temp dir), from a worker's command line."""
    args = Path(f"/proc/{worker_pid}/cmdline").read_bytes().split(b"\0")
    path = Path(args[args.index(b"--peer-dir") + 1].decode())
    assert path.name.startswith("ortserve-")
    return path


def test_scrapes_do_not_grow_files_or_memory(workers: ServerProcess) -> None:
    pids = worker_pids(workers)
    directory = peer_dir(pids[0])
    urls = [workers.metrics_url, f"{workers.http_url}/metrics"]
    with httpx.Client(timeout=WAIT_S) as client:

        def scrapes(count: int) -> None:
            for i in range(count):
                assert client.get(urls[i % 2]).status_code == 200

        scrapes(200)
        first = {pid: rss_kib(pid) for pid in pids.values()}
        files_before = sorted(p.name for p in directory.iterdir())
        scrapes(200)
        second = {pid: rss_kib(pid) for pid in pids.values()}
    assert sorted(p.name for p in directory.iterdir()) == files_before
    growth_mib = {pid: (second[pid] - first[pid]) / 1024 for pid in pids.values()}
    print(f"RSS after 200 scrapes {first} KiB, after 400 {second} KiB; peer dir files {files_before}")
    assert all(g < 8 for g in growth_mib.values()), growth_mib


def test_a_killed_worker_is_restarted_and_the_scrape_is_whole_again(workers: ServerProcess) -> None:
    served = [infer_on_fresh_connection(workers.address, SPARE) for _ in range(24)]
    # This scrape asks both workers for their counts (the last either reports before the kill).
    before = scrape(workers.metrics_url)
    assert model_value(before, "nv_inference_request_success", SPARE) == len(served)
    pids = worker_pids(workers)
    os.kill(pids[1], signal.SIGKILL)
    wait_until(lambda: worker_pids(workers).get(1, pids[1]) != pids[1], "worker 1 to be restarted", SLOW_WAIT_S)

    def whole(exp: Exposition) -> bool:
        return set(EVERY_FAMILY) - set(VLLM_HISTOGRAMS) - set(VLLM_GAUGES) - set(VLLM_COUNTERS) <= set(exp.types)

    # Both workers answer every scrape again (each asks its sibling): the restarted one's counts start at zero.
    for url in (workers.metrics_url, f"{workers.http_url}/metrics"):
        for _ in range(4):
            exp = wait_for_metric(url, whole, "a whole scrape after the restart", SLOW_WAIT_S)
            for name in SYSTEM_GAUGES:
                assert len(exp.series(name)) == 1, name
            total = model_value(exp, "nv_inference_request_success", SPARE)
            # A counter never goes down (Prometheus would read a drop as a reset): the restarted
            # worker carries on from what its predecessor last reported.
            assert total == len(served), (total, served.count("0"), served.count("1"))
    print(f"served by worker 0: {served.count('0')}, by worker 1 (killed): {served.count('1')}; "
          f"sum before the kill {len(served)}, after {total}")


# ---------------------------------------------------------------------------------------------------------------
# 8. Metrics off.


def test_allow_metrics_false_serves_no_metrics(tmp_path: Path) -> None:
    repo = small_repository(tmp_path / "repo", FRESH)
    server = ServerProcess(repo, tmp_path, "--allow-metrics", "false")
    try:
        assert not server.metrics_port_file.exists()
        assert server.metrics_port == 0
        assert httpx.get(f"{server.http_url}/metrics", timeout=WAIT_S).status_code == 404
        assert httpx.get(f"{server.http_url}/v2/health/live", timeout=WAIT_S).status_code == 200
    finally:
        assert server.stop() == 0, server.log()
