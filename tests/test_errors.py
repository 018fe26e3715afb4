"""Malformed requests get the exact status code, a clear message, and the server keeps serving."""

from __future__ import annotations

import struct
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

Build = Callable[[], pb.ModelInferRequest]


def _fp32(request: pb.ModelInferRequest, name: str, shape: list[int], values: np.ndarray | None = None) -> None:
    data = np.zeros(shape, np.float32) if values is None else values
    request.inputs.add(name=name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(data.astype(np.float32).tobytes())


def addsub(**overrides: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="addsub")
    _fp32(request, "a", [4])
    _fp32(request, "b", [4])
    for key, value in overrides.items():
        setattr(request, key, value)
    return request


def digits(batch: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    _fp32(request, "image", [batch, 1, 8, 8])
    return request


def suffix_raw(raw: bytes, shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="suffix")
    request.inputs.add(name="text", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _with(request: pb.ModelInferRequest, change: Callable[[pb.ModelInferRequest], object]) -> pb.ModelInferRequest:
    change(request)
    return request


def _typed_addsub(field: str, values: list, datatype: str = "FP32") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="addsub")
    a = request.inputs.add(name="a", datatype=datatype, shape=[4])
    getattr(a.contents, field).extend(values)
    request.inputs.add(name="b", datatype="FP32", shape=[4]).contents.fp32_contents.extend([0, 0, 0, 0])
    return request


INVALID = grpc.StatusCode.INVALID_ARGUMENT

CASES: dict[str, tuple[Build, grpc.StatusCode, str]] = {
    "unknown model": (lambda: addsub(model_name="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (lambda: addsub(model_version="7"), grpc.StatusCode.NOT_FOUND, "no version 7"),
    "non-numeric version": (lambda: addsub(model_version="v1"), INVALID, "version must be a number"),
    "empty model name": (lambda: addsub(model_name=""), INVALID, "model name is empty"),
    "name escaping the repository": (lambda: addsub(model_name="../addsub"), INVALID, "invalid model name"),
    "model that failed to load": (lambda: addsub(model_name="broken"), grpc.StatusCode.UNAVAILABLE, "not ready"),
    "unknown input": (
        lambda: _with(
            addsub(),
            lambda r: (r.inputs.add(name="c", datatype="FP32", shape=[4]), r.raw_input_contents.append(bytes(16))),
        ),
        INVALID, "unexpected input 'c'",
    ),
    "missing input": (
        lambda: _with(pb.ModelInferRequest(model_name="addsub"), lambda r: _fp32(r, "a", [4])),
        INVALID, "missing input(s) b",
    ),
    "duplicate input": (lambda: _with(addsub(), lambda r: _fp32(r, "a", [4])), INVALID, "more than once"),
    "wrong datatype": (lambda: _typed_addsub("fp64_contents", [0, 0, 0, 0], "FP64"), INVALID, "expects FP32"),
    "unknown datatype": (
        lambda: _with(addsub(), lambda r: setattr(r.inputs[0], "datatype", "FLOAT")),
        INVALID, "unknown datatype 'FLOAT'",
    ),
    "wrong rank": (
        lambda: _with(pb.ModelInferRequest(model_name="addsub"), lambda r: (_fp32(r, "a", [2, 2]), _fp32(r, "b", [4]))),
        INVALID, "expects [4]",
    ),
    "wrong dimension": (
        lambda: _with(pb.ModelInferRequest(model_name="addsub"), lambda r: (_fp32(r, "a", [5]), _fp32(r, "b", [4]))),
        INVALID, "expects [4]",
    ),
    "negative dimension": (
        lambda: _with(addsub(), lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([-4]))),
        INVALID, "invalid shape",
    ),
    "batch over max_batch_size": (lambda: digits(batch=65), INVALID, "max_batch_size 64"),
    "batch of zero": (lambda: digits(batch=0), INVALID, "batch dimension"),
    "raw byte count": (
        lambda: _with(addsub(), lambda r: r.raw_input_contents.__setitem__(0, bytes(15))), INVALID, "needs 16",
    ),
    "fewer raw entries than inputs": (
        lambda: _with(addsub(), lambda r: r.raw_input_contents.pop()), INVALID, "one per input",
    ),
    "raw and typed together": (
        lambda: _with(addsub(), lambda r: r.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])),
        INVALID, "sets contents while the request uses raw_input_contents",
    ),
    "typed element count": (lambda: _typed_addsub("fp32_contents", [1, 2, 3]), INVALID, "needs 4"),
    "typed field of another type": (
        lambda: _typed_addsub("int_contents", [1, 2, 3, 4]), INVALID, "use contents.fp32_contents",
    ),
    "FP16 sent typed": (
        lambda: _with(
            pb.ModelInferRequest(model_name="identity_fp16"),
            lambda r: r.inputs.add(name="in_fp16", datatype="FP16", shape=[1, 2]),
        ),
        INVALID, "must be sent in raw_input_contents",
    ),
    "INT8 out of range": (
        lambda: _with(
            pb.ModelInferRequest(model_name="identity_int8"),
            lambda r: r.inputs.add(name="in_int8", datatype="INT8", shape=[1, 2])
            .contents.int_contents.extend([1, 300]),
        ),
        INVALID, "outside the INT8 range",
    ),
    "BYTES cut inside a length prefix": (
        lambda: suffix_raw(b"\x01\x00", [1, 1]), INVALID, "inside a BYTES length prefix",
    ),
    "BYTES element past the end": (
        lambda: suffix_raw(struct.pack("<I", 10) + b"abc", [1, 1]), INVALID, "runs past the end",
    ),
    "BYTES element count": (lambda: suffix_raw(struct.pack("<I", 1) + b"a", [1, 2]), INVALID, "its shape needs 2"),
    "BYTES not UTF-8 for a string model": (
        lambda: suffix_raw(struct.pack("<I", 2) + b"\xff\xfe", [1, 1]), INVALID, "not valid UTF-8",
    ),
    "shape product overflow": (
        lambda: _with(addsub(), lambda r: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend([2**62, 2**62]))),
        INVALID, "raw contents",
    ),
    "unnamed input": (lambda: _with(addsub(), lambda r: setattr(r.inputs[0], "name", "")), INVALID, "has no name"),
    "unknown output": (
        lambda: _with(addsub(), lambda r: r.outputs.add(name="product")), INVALID, "unknown output 'product'",
    ),
    "classification of a BYTES output": (lambda: _classify_bytes(), INVALID, "cannot be classified"),
    "classification given as a string": (lambda: _classify_digits(string=True), INVALID, "classification must be"),
    "negative classification": (lambda: _classify_digits(count=-2), INVALID, "classification must be"),
}


def _classify_bytes() -> pb.ModelInferRequest:
    request = suffix_raw(struct.pack("<I", 1) + b"a", [1, 1])
    request.outputs.add(name="joined").parameters["classification"].int64_param = 1
    return request


def _classify_digits(count: int = 3, string: bool = False) -> pb.ModelInferRequest:
    request = digits()
    output = request.outputs.add(name="logits")
    if string:
        output.parameters["classification"].string_param = "3"
    else:
        output.parameters["classification"].int64_param = count
    return request


def _assert_still_serving(stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    response = stub.ModelInfer(addsub())
    assert [o.name for o in response.outputs] == ["sum", "difference"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_infer_request(stub, case: str) -> None:
    build, code, fragment = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(build(), timeout=30)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()
    _assert_still_serving(stub)


@pytest.mark.parametrize(
    "call, request_message, code",
    [
        ("ModelMetadata", pb.ModelMetadataRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
        ("ModelMetadata", pb.ModelMetadataRequest(name=""), INVALID),
        ("ModelMetadata", pb.ModelMetadataRequest(name="broken"), grpc.StatusCode.UNAVAILABLE),
        ("ModelConfig", pb.ModelConfigRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
        ("ModelConfig", pb.ModelConfigRequest(name="digits", version="3"), grpc.StatusCode.NOT_FOUND),
        ("ModelStatistics", pb.ModelStatisticsRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="digits"), grpc.StatusCode.PERMISSION_DENIED),
        (
            "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="digits"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(), grpc.StatusCode.UNIMPLEMENTED),
        ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(name="x"), grpc.StatusCode.UNIMPLEMENTED),
    ],
)
def test_other_rpcs_refuse_cleanly(stub, call: str, request_message, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, call)(request_message, timeout=30)
    assert err.value.code() == code
    assert err.value.details()
    _assert_still_serving(stub)


def test_garbage_bytes_on_the_wire(channel, stub) -> None:
    """A body that is not a ModelInferRequest at all is refused by gRPC itself, not a crash."""
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\xff\xff\xff\xff\x0f garbage", timeout=30)
    assert err.value.code() in (grpc.StatusCode.INTERNAL, INVALID)
    _assert_still_serving(stub)


def test_large_request_above_grpc_default_limit(stub) -> None:
    """8 MiB in one request: well over gRPC's 4 MiB default, accepted by ours."""
    request = pb.ModelInferRequest(model_name="suffix")
    element = b"x" * (1 << 20)
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 8])
    request.raw_input_contents.append((struct.pack("<I", len(element)) + element) * 8)
    response = stub.ModelInfer(request, timeout=60)
    assert len(response.raw_output_contents[0]) == 8 * (4 + len(element) + 1)
