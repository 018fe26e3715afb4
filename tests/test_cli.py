"""The `ortserve serve` command: start-up, device fallback, graceful shutdown with requests in flight."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import ROOT, ServerProcess


def _slow_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[256, 512])
    request.raw_input_contents.append(np.full((256, 512), 0.01, np.float32).tobytes())
    return request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_lets_in_flight_requests_finish(repository, tmp_path: Path, sig: signal.Signals) -> None:
    server = ServerProcess(repository.path, tmp_path, "--strict-readiness", "false")
    results: list[object] = []
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(_slow_request(), timeout=60)  # warm up
        started = time.perf_counter()
        stub.ModelInfer(_slow_request(), timeout=60)
        one_run_s = time.perf_counter() - started

        def call() -> None:
            try:
                results.append(stub.ModelInfer(_slow_request(), timeout=60))
            except grpc.RpcError as exc:
                results.append(exc)

        workers = [threading.Thread(target=call) for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(min(one_run_s / 2, 0.2))
        server.process.send_signal(sig)
        for worker in workers:
            worker.join(timeout=60)
    code = server.stop()
    assert code == 0, server.log()
    assert len(results) == 3
    finished = [r for r in results if isinstance(r, pb.ModelInferResponse)]
    # Requests admitted before the signal complete; none may end with UNKNOWN or hang.
    assert finished, [r for r in results]
    for result in results:
        if isinstance(result, grpc.RpcError):
            assert result.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), result
    assert "shutting down" in server.log()


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
