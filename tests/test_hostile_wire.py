"""Hostile bytes on the wire: every service answers a proper status, never UNKNOWN or INTERNAL.

Malformed bodies on every RPC path, sizes claimed by the client that its bytes do not
back, and client text long enough to break gRPC's metadata limits if it were echoed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from tritonclient.grpc import service_pb2 as pb

from server.core.errors import InvalidInputError
from server.rpc import status
from tests.test_property import rpc_paths

WAIT_S = 60
INFERENCE = "/inference.GRPCInferenceService/"
BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# Not a protobuf message: a field tag followed by a varint that never ends.
GARBAGE = b"\x08" + b"\xff" * 11
LONG = "n" * 100_000


def call_raw(
    channel: grpc.Channel, path: str, body: bytes, client_streaming: bool, server_streaming: bool
) -> list[bytes]:
    """Sends `body` as is (no serializer) on `path`; returns the raw response messages."""
    if client_streaming and server_streaming:
        return list(channel.stream_stream(path)(iter([body]), timeout=WAIT_S))
    if server_streaming:
        return list(channel.unary_stream(path)(body, timeout=WAIT_S))
    if client_streaming:
        return [channel.stream_unary(path)(iter([body]), timeout=WAIT_S)]
    return [channel.unary_unary(path)(body, timeout=WAIT_S)]


@pytest.fixture(scope="module")
def raw_channel(server) -> Iterator[grpc.Channel]:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.mark.parametrize("path,client_streaming,server_streaming", rpc_paths(), ids=lambda v: str(v))
def test_malformed_body_is_invalid_argument_on_every_path(
    raw_channel, path: str, client_streaming: bool, server_streaming: bool
) -> None:  # type: ignore[no-untyped-def]
    try:
        responses = call_raw(raw_channel, path, GARBAGE, client_streaming, server_streaming)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, exc.code(), exc.details())
        assert "request body is not a valid" in exc.details()
        return
    # ModelStreamInfer reports a bad request inside the stream and stays open (Triton's way).
    assert path == INFERENCE + "ModelStreamInfer", path
    assert len(responses) == 1
    assert "request body is not a valid" in pb.ModelStreamInferResponse.FromString(responses[0]).error_message


def test_reflection_v1_is_unimplemented_not_unknown(raw_channel) -> None:  # type: ignore[no-untyped-def]
    """Only v1alpha reflection is served (grpcurl falls back to it); v1 must still answer properly."""
    with pytest.raises(grpc.RpcError) as caught:
        call_raw(raw_channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", GARBAGE, True, True)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_well_formed_health_and_reflection_still_work(raw_channel) -> None:  # type: ignore[no-untyped-def]
    check = raw_channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    status = check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        check(health_pb2.HealthCheckRequest(service=LONG), timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    watch = raw_channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    stream = watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    stream.cancel()
    reflect = raw_channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (answer,) = list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT_S))
    assert "inference.GRPCInferenceService" in [s.name for s in answer.list_services_response.service]


# Sizes claimed by the client: checked against the bytes received before anything is allocated.


def bytes_request(shape: list[int], raw: bytes | None = b"") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="identity_bytes")
    request.inputs.add(name="in_bytes", datatype="BYTES", shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def fp32_request(shape: list[int], raw: bytes = b"") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="in_fp32", datatype="FP32", shape=shape)
    request.raw_input_contents.append(raw)
    return request


CLAIMED = {
    "bytes_1x2^24_raw": bytes_request([1, 1 << 24]),
    "bytes_2^40x2^40_raw": bytes_request([1 << 40, 1 << 40]),
    "bytes_2^40x2^40_typed": bytes_request([1 << 40, 1 << 40], raw=None),
    "bytes_2^62_one_prefix": bytes_request([1 << 62], raw=b"\x00\x00\x00\x00"),
    "fp32_2^40x2^40": fp32_request([1 << 40, 1 << 40]),
    "fp32_2^63-1": fp32_request([(1 << 63) - 1, 2]),
    "fp32_zero_rows_huge_cols": fp32_request([0, (1 << 63) - 1, (1 << 63) - 1]),
    "fp32_negative": fp32_request([-1, 2]),
    "fp32_min_int64": fp32_request([-(1 << 63), -(1 << 63)]),
}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("name", list(CLAIMED))
def test_claimed_sizes_are_invalid_argument(stub, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(CLAIMED[name], timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


def test_claimed_sizes_do_not_grow_the_server_memory(server, stub) -> None:  # type: ignore[no-untyped-def]
    def send_all() -> None:
        for request in (CLAIMED["bytes_1x2^24_raw"], CLAIMED["bytes_2^40x2^40_raw"], CLAIMED["bytes_2^62_one_prefix"]):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=WAIT_S)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    send_all()  # first calls warm up code paths and buffers
    before = rss_bytes(server.process.pid)
    for _ in range(20):
        send_all()
    grown = rss_bytes(server.process.pid) - before
    # Before the fix one [1, 2^24] BYTES request allocated 128 MiB of object pointers.
    assert grown < 16 * 2**20, f"server RSS grew by {grown / 2**20:.1f} MiB"
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=WAIT_S).live


def test_a_real_bytes_tensor_still_decodes(stub) -> None:  # type: ignore[no-untyped-def]
    values = [b"", b"a", b"\x00" * 5, "é".encode()]
    request = bytes_request([2, 2], raw=b"".join(len(v).to_bytes(4, "little") + v for v in values))
    response = stub.ModelInfer(request, timeout=WAIT_S)
    assert list(response.outputs[0].shape) == [2, 2]
    assert response.raw_output_contents[0] == request.raw_input_contents[0]


# Client text is quoted only up to a bound; no answer comes near gRPC's metadata limit (16 KiB).


def expect_short_error(call, request, codes: tuple[grpc.StatusCode, ...]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=WAIT_S)
    assert caught.value.code() in codes, (caught.value.code(), caught.value.details()[:300])
    assert len(caught.value.details()) <= status.MAX_MESSAGE_CHARS


def digits_request(**fields: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits", **fields)
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(bytes(4 * 64))
    return request


NOT_FOUND_OR_INVALID = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
INVALID = (grpc.StatusCode.INVALID_ARGUMENT,)


def test_long_model_name_gives_a_short_error_on_every_model_rpc(stub) -> None:  # type: ignore[no-untyped-def]
    expect_short_error(stub.ModelInfer, pb.ModelInferRequest(model_name=LONG), NOT_FOUND_OR_INVALID)
    expect_short_error(stub.ModelMetadata, pb.ModelMetadataRequest(name=LONG), NOT_FOUND_OR_INVALID)
    expect_short_error(stub.ModelConfig, pb.ModelConfigRequest(name=LONG), NOT_FOUND_OR_INVALID)
    expect_short_error(stub.ModelStatistics, pb.ModelStatisticsRequest(name=LONG), NOT_FOUND_OR_INVALID)
    expect_short_error(stub.ModelMetadata, pb.ModelMetadataRequest(name="digits", version=LONG), NOT_FOUND_OR_INVALID)
    try:
        ready = stub.ModelReady(pb.ModelReadyRequest(name=LONG), timeout=WAIT_S).ready
    except grpc.RpcError as exc:
        assert exc.code() in NOT_FOUND_OR_INVALID and len(exc.details()) <= status.MAX_MESSAGE_CHARS
    else:
        assert not ready


def test_long_request_text_gives_a_short_error(stub) -> None:  # type: ignore[no-untyped-def]
    long_id = digits_request(id=LONG)
    long_id.inputs[0].shape[:] = [1, 1, 8, 9]  # any mistake, so that the message could quote the id
    expect_short_error(stub.ModelInfer, long_id, INVALID)

    long_input = digits_request()
    long_input.inputs[0].name = LONG
    expect_short_error(stub.ModelInfer, long_input, INVALID)

    long_datatype = digits_request()
    long_datatype.inputs[0].datatype = LONG
    expect_short_error(stub.ModelInfer, long_datatype, INVALID)

    long_output = digits_request()
    long_output.outputs.add(name=LONG)
    expect_short_error(stub.ModelInfer, long_output, INVALID)

    long_class = digits_request()
    long_class.outputs.add(name=LONG).parameters["classification"].string_param = LONG
    expect_short_error(stub.ModelInfer, long_class, INVALID)

    long_key = digits_request()
    long_key.parameters[LONG].string_param = LONG
    long_key.parameters["priority"].string_param = LONG  # a known key with a wrong value: refused
    expect_short_error(stub.ModelInfer, long_key, INVALID)


def test_long_text_in_a_stream_gives_a_short_error_message(stub) -> None:  # type: ignore[no-untyped-def]
    long_input = digits_request()
    long_input.inputs[0].name = LONG
    answers = list(stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name=LONG), long_input]), timeout=WAIT_S))
    assert len(answers) == 2
    for answer in answers:
        assert answer.error_message
        assert len(answer.error_message) <= status.MAX_MESSAGE_CHARS


def test_status_messages_are_capped_whatever_a_layer_puts_in_them() -> None:
    code, message = status.status_for(InvalidInputError("x" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) == status.MAX_MESSAGE_CHARS
    assert message.endswith("(message cut)")
    assert status.status_for(InvalidInputError("short"))[1] == "short"


def test_server_is_alive_after_the_hostile_requests(stub) -> None:  # type: ignore[no-untyped-def]
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=WAIT_S).live
    response = stub.ModelInfer(digits_request(), timeout=WAIT_S)
    assert list(response.outputs[0].shape) == [1, 10]
