"""The Grafana dashboard (deploy/grafana) against the metric families a real server exports.

A dashboard query naming a family the server does not export draws an empty panel and no error anywhere,
so this test reads every PromQL expression in the dashboard, takes out the metric names it uses and
checks each against a scrape of a server that has answered tensor and text-generation requests.
The PromQL helpers here are also used by tests/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, ServerProcess

DASHBOARD = ROOT / "deploy" / "grafana" / "ortserve-dashboard.json"
PROMETHEUS_DS = {"type": "prometheus", "uid": "${datasource}"}
WAIT_S = 120

# Words PromQL reserves outside function calls; every function or aggregation is followed by "(" once the
# by/without/on/ignoring/group_* label lists are removed, so no list of function names is needed.
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# Grafana variables: $name, ${name}, ${name:format}, [[name]].
VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
# A number or a duration is one token, so the "e6" of 1e6 or the "m" of 5m is not read as a name.
TOKENS = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)"
    r"|(?P<name>[A-Za-z_:][\w:]*)(?P<call>\s*\()?"
)
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"})


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, label names or variables).

    Selectors by `{__name__=...}` alone are not resolved; the dashboard does not use them.
    """
    text = STRINGS.sub(" ", expr)
    text = VARIABLES.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers: label names and (already removed) values
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = GROUPING.sub(" ", text)
    names = set()
    for token in TOKENS.finditer(text):
        name = token.group("name")
        if name and not token.group("call") and name.lower() not in KEYWORDS:
            names.add(name)
    return names


def label_values_metrics(query: str) -> set[str]:
    """Metric names in a Grafana variable query such as label_values(nv_inference_count, model)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    return metric_names(match.group(1)) if match else metric_names(query)


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, as Grafana would send it to Prometheus."""
    text = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "1h")
    return VARIABLES.sub(".*", text)


@dataclass
class Exposition:
    """A scrape in the text format: each family's declared type, and the sample names present."""

    types: dict[str, str]
    samples: set[str]


def parse_exposition(text: str) -> Exposition:
    types: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][\w:]*", line)
            assert match, f"not a sample line: {line!r}"
            samples.add(match.group(0))
    return Exposition(types, samples)


# The sample-name suffixes a family of each type adds to its name.
SUFFIXES = {"_bucket": ("histogram",), "_sum": ("histogram", "summary"), "_count": ("histogram", "summary")}


def family_of(name: str, exposition: Exposition) -> str | None:
    """The declared family a sample name in a query belongs to, or None."""
    if name in exposition.types:
        return name
    for suffix, kinds in SUFFIXES.items():
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and exposition.types.get(base) in kinds:
            return base
    # Some libraries declare a counter without its `_total` sample suffix.
    base = name.removesuffix("_total")
    if name.endswith("_total") and exposition.types.get(base) == "counter":
        return base
    return None


def poll(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Polls an HTTP-backed `predicate()` (every 0.2 s, not to load the 2 cores) until true or a timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def digits_image(seed: int = 0) -> np.ndarray:
    """One [1, 1, 8, 8] FP32 image for the committed digits model (any values: only counts are checked)."""
    return np.random.default_rng(seed).random((1, 1, 8, 8), dtype=np.float32)


def infer_digits_grpc(address: str, count: int) -> None:
    """`count` single-image requests through tritonclient's gRPC client, one after another, each on its own
    connection: a server with several workers then spreads them over its processes."""
    for i in range(count):
        client = grpcclient.InferenceServerClient(address)
        try:
            image = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
            image.set_data_from_numpy(digits_image(i))
            client.infer("digits", [image])
        finally:
            client.close()


def copy_models(repo: Path, *names: str) -> Path:
    """A repository holding copies of the committed models `names` (no training needed)."""
    for name in names:
        shutil.copytree(ROOT / "model_repository" / name, repo / name)
    return repo


def scrape(url: str) -> str:
    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return response.text


def used_names(dashboard: dict[str, Any]) -> set[str]:
    names = set().union(*(metric_names(expr) for expr in exprs(dashboard)))
    return names.union(*(label_values_metrics(query) for query in variable_queries(dashboard)))


# ---- the dashboard file alone ----


def test_metric_names_are_taken_from_promql() -> None:
    cases = {
        'histogram_quantile(0.99, sum by (le, model) (rate(ortserve_request_duration_seconds_bucket'
        '{model=~"$model"}[$__rate_interval])))': {"ortserve_request_duration_seconds_bucket"},
        'sum by (model_name) (rate(vllm:generation_tokens_total{model_name=~"${generation_model}"}[5m])) / 1e6':
            {"vllm:generation_tokens_total"},
        "a offset 5m and on(instance) b > bool 0.5": {"a", "b"},
        "sum(rate(x_total[1m])) without (code) * 2e-3 + 0x1f": {"x_total"},
        'label_replace(up, "dst", "$1", "src", "(.*)")': {"up"},
        "max(cpu) unless ignoring(job) group_left(foo, bar) mem_used / mem_total": {"cpu", "mem_used", "mem_total"},
        "max_over_time(deriv(x[5m:30s])[1h:]) > Inf or NaN": {"x"},
        "topk(3, sum by (reason) (rate(nv_inference_request_failure{reason!='OTHER'}[[[interval]]])))":
            {"nv_inference_request_failure"},
        "count_values(\"v\", build_info) @ end()": {"build_info"},
    }
    for expr, expected in cases.items():
        assert metric_names(expr) == expected, expr
    assert label_values_metrics("label_values(nv_inference_count, model)") == {"nv_inference_count"}
    assert label_values_metrics("label_values(vllm:num_requests_running{job=\"x\"}, model_name)") == {
        "vllm:num_requests_running"}


def test_family_resolution_follows_the_exposition_suffixes() -> None:
    exposition = parse_exposition(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n"
        "# TYPE c counter\nc_total 2\n# TYPE nv_x counter\nnv_x{model=\"m\"} 3\n# TYPE g gauge\ng 1\n"
    )
    assert exposition.samples == {"h_bucket", "h_sum", "h_count", "c_total", "nv_x", "g"}
    assert [family_of(n, exposition) for n in ("h_bucket", "h_count", "c_total", "nv_x", "g")] == [
        "h", "h", "c", "nv_x", "g"]
    assert family_of("g_bucket", exposition) is None and family_of("missing", exposition) is None


def test_dashboard_is_valid_grafana_json_with_prometheus_datasources() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard.get("id") is None
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variable_queries(dashboard) and variables["model"]["definition"] == "label_values(nv_inference_count, model)"
    for panel in panels(dashboard):
        if panel["type"] == "row":  # a row only groups panels: it queries nothing
            continue
        assert panel["datasource"] == PROMETHEUS_DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == PROMETHEUS_DS and target["expr"].strip(), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == PROMETHEUS_DS, variable["name"]


def test_dashboard_uses_only_defined_variables_and_rate_interval() -> None:
    dashboard = load_dashboard()
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    for expr in exprs(dashboard):
        for variable in VARIABLES.findall(expr):
            name = re.sub(r"^\$\{?|\[\[|[:}\]].*$", "", variable)
            assert name in defined, f"{variable} in {expr}"
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), f"fixed range in {expr}"


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    """PromQL syntax, checked by Prometheus's own parser: the expressions become recording rules."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run scripts/setup.sh (it installs Debian's prometheus package)")
    dashboard = load_dashboard()
    queries = exprs(dashboard) + [
        re.sub(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", r"\1", q) for q in variable_queries(dashboard)]
    rules = [{"record": f"dashboard:expr{i}", "expr": as_promql(q)} for i, q in enumerate(queries)]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- against a real server ----


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server over the committed digits and bytes_decoder that has answered tensor requests (gRPC and
    HTTP) and text-generation requests, so that every labelled family has a series."""
    repo = copy_models(tmp_path_factory.mktemp("metrics_repo"), "digits", "bytes_decoder")
    server = ServerProcess(repo, tmp_path_factory.mktemp("metrics_server"))
    try:
        infer_digits_grpc(server.address, 3)
        body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                            "data": digits_image().ravel().tolist()}]}
        httpx.post(f"{server.http_url}/v2/models/digits/infer", json=body, timeout=60).raise_for_status()
        completion = {"model": "bytes_decoder", "prompt": "def ", "max_tokens": 4, "temperature": 0,
                      "ignore_eos": True}
        httpx.post(f"{server.http_url}/v1/completions", json=completion, timeout=60).raise_for_status()
        yield server
    finally:
        assert server.stop() == 0, server.log()


def test_every_dashboard_metric_is_a_family_the_server_exports(busy_server: ServerProcess) -> None:
    assert busy_server.metrics_port, "the server wrote no metrics port file"
    names = used_names(load_dashboard())
    last: list[str] = []

    def missing() -> list[str]:
        # A request's metrics may be recorded just after its answer: wait for them rather than race.
        exposition = parse_exposition(scrape(busy_server.metrics_url))
        last[:] = sorted(n for n in names if family_of(n, exposition) is None or n not in exposition.samples)
        return last

    try:
        poll(lambda: not missing(), "every metric the dashboard uses")
    except AssertionError:
        raise AssertionError(f"the dashboard uses metrics the server does not export: {last}") from None


def test_rate_is_taken_of_counters_only(busy_server: ServerProcess) -> None:
    """rate() of a gauge is a silent mistake: every name under rate() is a counter or a histogram series."""
    exposition = parse_exposition(scrape(busy_server.metrics_url))
    for expr in exprs(load_dashboard()):
        for name in re.findall(r"\b(?:rate|irate|increase)\(\s*([A-Za-z_:][\w:]*)", expr):
            family = family_of(name, exposition)
            assert family is not None, name
            kind = exposition.types[family]
            assert kind == "counter" or (kind == "histogram" and name != family), f"rate of {kind} {name}"
