"""grpcurl through server reflection (no .proto files), and the standard gRPC health service."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def grpcurl(address: str, *words: str, flags: tuple[str, ...] = ()) -> str:
    """Runs `grpcurl -plaintext [flags] address words...` and returns its output."""
    result = subprocess.run(
        [GRPCURL, "-plaintext", *flags, address, *words], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_services(server) -> None:
    services = grpcurl(server.address, "list").split()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


def test_describe_service_and_message(server) -> None:
    service = grpcurl(server.address, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse )" in service
    assert (
        "rpc ModelStreamInfer ( stream .inference.ModelInferRequest )"
        " returns ( stream .inference.ModelStreamInferResponse )"
    ) in service
    message = grpcurl(server.address, "describe", "inference.ModelInferRequest")
    assert "repeated bytes raw_input_contents = 7;" in message
    config = grpcurl(server.address, "describe", "inference.ModelConfig")
    assert "int32 max_batch_size = 4;" in config
    health = grpcurl(server.address, "describe", "grpc.health.v1.Health")
    assert "rpc Check" in health


def test_server_ready_and_infer_through_reflection(server) -> None:
    assert json.loads(grpcurl(server.address, "inference.GRPCInferenceService/ServerReady")) == {"ready": True}
    body = json.dumps({
        "model_name": "addsub",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [4], "contents": {"fp32_contents": [1, 2, 3, 4]}},
            {"name": "b", "datatype": "FP32", "shape": [4], "contents": {"fp32_contents": [1, 1, 1, 1]}},
        ],
    })
    response = json.loads(grpcurl(server.address, "inference.GRPCInferenceService/ModelInfer", flags=("-d", body)))
    assert [o["name"] for o in response["outputs"]] == ["sum", "difference"]
    raw = response.get("rawOutputContents") or response["raw_output_contents"]
    assert [list(struct.unpack("<4f", base64.b64decode(r))) for r in raw] == [[2, 3, 4, 5], [0, 1, 2, 3]]


@pytest.fixture()
def health_stub(channel):  # type: ignore[no-untyped-def]
    return health_pb2_grpc.HealthStub(channel)


def test_health_of_server_and_models(health_stub) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_stub.Check(health_pb2.HealthCheckRequest(service="")).status == serving
    assert health_stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status == serving
    assert health_stub.Check(health_pb2.HealthCheckRequest(service="digits")).status == serving
    assert health_stub.Check(health_pb2.HealthCheckRequest(service="broken")).status == not_serving
    with pytest.raises(grpc.RpcError) as err:
        health_stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
