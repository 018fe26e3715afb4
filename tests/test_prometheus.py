"""ortserve's metrics through the real Prometheus: scraped, stored and queried, and linted by promtool.

The test starts Debian's `prometheus` binary (scripts/setup.sh installs it) with its own configuration and
storage, scraping a server of its own every second, and waits on Prometheus's answers, never on time.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess
from tests.test_metrics_dashboard import (
    as_promql,
    copy_models,
    exprs,
    infer_digits_grpc,
    load_dashboard,
    poll,
    scrape,
)

REQUESTS = 7  # single-image requests to digits: nv_inference_count must reach exactly this


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run scripts/setup.sh (it installs Debian's prometheus package)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def metrics_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server over a copy of the committed digits model; only this module sends it requests.
    With two workers the requests spread over two processes, and one scrape must add up both."""
    server = ServerProcess(copy_models(tmp_path_factory.mktemp("prom_repo"), "digits"),
                           tmp_path_factory.mktemp("prom_server"), "--workers", str(request.param))
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def sent(metrics_server: ServerProcess) -> int:
    """Sends the requests once; returns how many."""
    infer_digits_grpc(metrics_server.address, REQUESTS)
    return REQUESTS


class Prometheus:
    """A `prometheus` child process scraping one target every second, on a free loopback port."""

    def __init__(self, workdir: Path, target: str) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "ortserve", "static_configs": [{"targets": [target]}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        poll(self._ready, "prometheus to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector; fails on a query Prometheus rejects."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
        assert body["data"]["resultType"] == "vector", promql
        return list(body["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        """The value of a one-element result, or None while there is none."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: {result}"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def prometheus(metrics_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    assert metrics_server.metrics_port, "the server wrote no metrics port file"
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{metrics_server.metrics_port}")
    yield prom
    prom.stop()


def test_prometheus_stores_the_exact_request_count_and_a_latency_quantile(prometheus: Prometheus, sent: int) -> None:
    def reached(promql: str) -> bool:
        return prometheus.scalar(promql) == sent

    poll(lambda: reached('sum(nv_inference_count{model="digits"})'), f"nv_inference_count to reach {sent}")
    poll(lambda: reached('sum(nv_inference_request_success{model="digits"})'), "the success count")
    # Each request is one histogram observation.
    poll(lambda: reached('sum(ortserve_request_duration_seconds_count{model="digits"})'), "the histogram count")
    median = prometheus.scalar(
        'histogram_quantile(0.5, sum by (le) (ortserve_request_duration_seconds_bucket{model="digits"}))')
    assert median is not None and math.isfinite(median) and 0 < median <= 10, median
    up = prometheus.scalar('up{job="ortserve"}')
    assert up == 1, prometheus.log()


def test_prometheus_accepts_every_dashboard_expression(prometheus: Prometheus, sent: int) -> None:
    """Each panel's query, with Grafana's variables filled in, is a query Prometheus runs without error."""
    poll(lambda: prometheus.scalar('sum(nv_inference_count{model="digits"})') == sent, "the requests scraped")
    for expr in exprs(load_dashboard()):
        prometheus.query(as_promql(expr))


# promtool's naming lints that the contract itself causes: the nv_* names are Triton's and the vllm:* names are
# vLLM's, kept as they are so that existing Triton/vLLM dashboards and alerts work against ortserve. Only these
# exact (metric, lint) lines are let through; any other line promtool prints fails the test.
TRITON_COUNTERS = (
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
)
VLLM_FAMILIES = (
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:request_success_total",
)
CONTRACT_LINTS = frozenset(
    [f'{name} counter metrics should have "_total" suffix' for name in TRITON_COUNTERS]
    + [f'{name} non-histogram and non-summary metrics should not have "_count" suffix'
       for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_pending_request_count")]
    + [f"{name} metric names should not contain abbreviated units" for name in TRITON_COUNTERS if name.endswith("_us")]
    + [f"{name} metric names should not contain ':'" for name in VLLM_FAMILIES]
)


def promtool_check_metrics(exposition: str) -> tuple[int, list[str]]:
    """promtool's exit code, and what it printed less the contract's own lints."""
    result = subprocess.run([tool("promtool"), "check", "metrics"], input=exposition, capture_output=True,
                            text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    others = [line for line in lines if line.strip() not in CONTRACT_LINTS]
    # promtool exits 3 for lint findings alone; with only the contract's findings that is a pass.
    code = 0 if result.returncode == 3 and lines and not others else result.returncode
    return code, others


@pytest.mark.parametrize("port", ["metrics", "http"])
def test_promtool_finds_nothing_to_lint(metrics_server: ServerProcess, sent: int, port: str) -> None:
    """The exposition, after traffic so labelled families have series, at both places it is served."""
    url = metrics_server.metrics_url if port == "metrics" else f"{metrics_server.http_url}/metrics"
    assert promtool_check_metrics(scrape(url)) == (0, [])


def test_the_lint_filter_passes_only_the_contract_lints() -> None:
    contract = "# HELP nv_inference_count n\n# TYPE nv_inference_count counter\nnv_inference_count{model=\"m\"} 1\n"
    assert promtool_check_metrics(contract) == (0, [])
    code, others = promtool_check_metrics(contract + "# HELP ortserve_x x\n# TYPE ortserve_x counter\nortserve_x 1\n")
    assert code == 3 and others == ['ortserve_x counter metrics should have "_total" suffix']


def test_promtool_accepts_the_example_scrape_config() -> None:
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    result = subprocess.run([tool("promtool"), "check", "config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
