"""The `ortserve serve` command: start-up, device fallback, graceful shutdown with requests in flight."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import ROOT, ServerProcess
from tests.gate import WAIT_S, wait_until


def _gated_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="gated")
    request.inputs.add(name="x", datatype="FP32", shape=[256, 512])
    request.raw_input_contents.append(np.full((256, 512), 0.01, np.float32).tobytes())
    return request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_lets_in_flight_requests_finish(repository, tmp_path: Path, sig: signal.Signals) -> None:
    gate = repository.gates["gated"]
    server = ServerProcess(repository.path, tmp_path, "--strict-readiness", "false")
    results: list[object] = []
    with grpc.insecure_channel(server.address) as channel, gate.held():
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def call() -> None:
            try:
                results.append(stub.ModelInfer(_gated_request(), timeout=WAIT_S))
            except grpc.RpcError as exc:
                results.append(exc)

        seen = len(gate.entered())
        workers = [threading.Thread(target=call) for _ in range(3)]
        for worker in workers:
            worker.start()
        run = gate.wait_entered(seen)  # one request is running (held), the others queued or arriving
        server.process.send_signal(sig)
        wait_until(lambda: "shutting down" in server.log(), "the server to start shutting down")
        gate.release(run)
        gate.open()  # anything else admitted may run too
        for worker in workers:
            worker.join(timeout=WAIT_S)
    code = server.stop()
    assert code == 0, server.log()
    assert len(results) == 3
    finished = [r for r in results if isinstance(r, pb.ModelInferResponse)]
    # The request running when the signal came completes; none may end with UNKNOWN or hang.
    assert finished, [r for r in results]
    for result in results:
        if isinstance(result, grpc.RpcError):
            assert result.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), result


def test_cuda_requested_without_a_gpu_falls_back_with_a_warning(repository, tmp_path: Path) -> None:
    small = tmp_path / "repo"
    small.mkdir()
    shutil.copytree(repository.path / "addsub", small / "addsub")
    server = ServerProcess(small, tmp_path, "--device", "cuda")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="addsub"), timeout=30).config
    finally:
        assert server.stop() == 0
    provider = config.parameters["execution_provider"].string_value
    if provider == "CPUExecutionProvider":
        assert "WARNING" in server.log() and "CUDAExecutionProvider" in server.log()
        assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    else:
        assert provider == "CUDAExecutionProvider"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "99999"], "port"),
        (["--device", "tpu"], "invalid choice"),
        (["--model-repository", "/no/such/dir"], "not a directory"),
    ],
)
def test_bad_command_lines_exit_with_a_message(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr
