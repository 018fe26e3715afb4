"""Shared fixtures: a model repository built by our exporters, and a real server process on loopback.

The server runs as a child process (`python -m server serve --port 0`) so that tests
exercise the real CLI, signal handling and wire, exactly as a client sees them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from exporters.export import ExportSpec, export_torch
from exporters.graphs import ONNX_TYPES, export_graph, identity_model, suffix_model
from exporters.models import digits
from tests.gate import Gate, gate_config

ROOT = Path(__file__).resolve().parent.parent


class MixModel(torch.nn.Module):
    """A fixed [n, 512] FP32 model: a few tanh(x @ W) layers. Its run time does not matter:
    the tests that need a busy instance hold its runs at a gate (tests/gate.py)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(512, 512) / 512**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = torch.tanh(x @ self.weight)
        return x


class AddSub(torch.nn.Module):
    """Two fixed-shape [4] FP32 inputs -> sum and difference; no batching."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a - b


@dataclass
class TestRepository:
    """The repository path, the trained digits model (to compare with PyTorch) and the gates.

    `gates` holds one Gate per gated model: `gated` (fixed batch [256, 512], no batching)
    and `gated_batched` (max_batch_size 256, dynamic batching, a queue of one request), and
    `gated_pair` (the same with a queue of two).
    """

    path: Path
    digits_model: digits.DigitsCNN
    gates: dict[str, Gate]


def build_repository(root: Path) -> TestRepository:
    """Every test model, made by our exporters with fixed seeds."""
    config = digits.DigitsConfig(epochs=6)
    model, _ = digits.train(config, progress=False)
    digits.export(model, root)
    export_torch(
        AddSub(), (torch.zeros(4), torch.zeros(4)),
        ExportSpec(["a", "b"], ["sum", "difference"], dynamic_batch=False), root, "addsub",
    )
    gates = {name: Gate(root.parent / f"{root.name}-gates" / name) for name in ("gated", "gated_batched", "gated_pair")}
    export_torch(
        MixModel(), (torch.zeros(256, 512),),
        ExportSpec(["x"], ["y"], dynamic_batch=False, atol=1e-3, extra_config=gate_config(gates["gated"].directory)),
        root, "gated",
    )
    export_torch(
        MixModel(), (torch.zeros(2, 512),),
        ExportSpec(
            ["x"], ["y"], max_batch_size=256, atol=1e-3,
            extra_config="dynamic_batching { default_queue_policy { max_queue_size: 1 } }\n"
            + gate_config(gates["gated_batched"].directory),
        ),
        root, "gated_batched",
    )
    export_torch(
        MixModel(), (torch.zeros(2, 512),),
        ExportSpec(
            ["x"], ["y"], max_batch_size=256, atol=1e-3,
            extra_config="dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
            + gate_config(gates["gated_pair"].directory),
        ),
        root, "gated_pair",
    )
    for datatype in ONNX_TYPES:
        export_graph(
            identity_model([datatype], ["batch", 2]), ExportSpec([], [], max_batch_size=8), root,
            f"identity_{datatype.lower()}",
        )
    export_graph(suffix_model("!"), ExportSpec([], [], max_batch_size=8), root, "suffix")
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    return TestRepository(root, model, gates)


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> TestRepository:
    return build_repository(tmp_path_factory.mktemp("model_repository"))


class ServerProcess:
    """An `ortserve serve` child process on free loopback ports.

    gRPC is at `address`; HTTP (unless `--allow-http false`) at `http_address` / `http_url`,
    its port read from the port file's `.http` sibling; Prometheus metrics (unless
    `--allow-metrics false`) at `metrics_url`, the port from the `.metrics` sibling.
    """

    def __init__(self, repository: Path, workdir: Path, *extra: str) -> None:
        self.port_file = workdir / "port"
        self.log_path = workdir / "server.log"
        self.port_file.unlink(missing_ok=True)
        # One process unless a test asks for workers: lighter, and its log holds everything.
        workers = [] if "--workers" in extra else ["--workers", "1"]
        # A free HTTP port too: Triton's 8000 would collide between test servers.
        http = [] if "--http-port" in extra else ["--http-port", "0"]
        http += [] if "--metrics-port" in extra else ["--metrics-port", "0"]
        self.http_port_file = workdir / "port.http"
        self.metrics_port_file = workdir / "port.metrics"
        for path in (self.http_port_file, self.metrics_port_file):
            path.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "server", "serve", "--model-repository", str(repository),
            "--host", "127.0.0.1", "--port", "0", "--port-file", str(self.port_file), *workers, *http, *extra,
        ]
        self._log = open(self.log_path, "wb")
        # Gated test models (tests/gate.py) load only where the test gates are enabled.
        env = {**os.environ, "ORTSERVE_TEST_GATES": "1"}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.port_file.exists() or not self.port_file.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"
        # Written before the gRPC port file; absent when HTTP is off.
        self.http_port = int(self.http_port_file.read_text()) if self.http_port_file.exists() else 0
        self.http_address = f"127.0.0.1:{self.http_port}"
        self.http_url = f"http://{self.http_address}"
        # Also written before the gRPC port file; absent when metrics are off.
        self.metrics_port = int(self.metrics_port_file.read_text()) if self.metrics_port_file.exists() else 0
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


@pytest.fixture(scope="session")
def server(repository: TestRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(repository.path, tmp_path_factory.mktemp("server"), "--strict-readiness", "false")
    yield process
    code = process.stop()
    assert code == 0, f"server exited with {code}:\n{process.log()}"


@pytest.fixture(scope="session")
def triton(server: ServerProcess):  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.address)
    yield client
    client.close()


@pytest.fixture(scope="session")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]
    with grpc.insecure_channel(server.address, options=options) as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    """tritonclient's own generated stub: a client we did not write, speaking the raw messages."""
    from tritonclient.grpc import service_pb2_grpc

    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def pytest_configure(config: pytest.Config) -> None:
    # Keep torch from fighting the server process for the 2 cores.
    torch.set_num_threads(1)
