"""ModelInfer's fast path in a running server: the same answers, to the byte, as the general path.

The session server serves identity models for every datatype. Each request is sent twice as raw
bytes: once as the fast path takes it (raw contents), once with an input parameter, which the
general path ignores and the fast path declines; the two answers must be the same bytes.
tritonclient (its own encoder, the request parameters perf_analyzer sends) goes through it too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from exporters.graphs import ONNX_TYPES
from server.core import datatypes
from server.core.types import InferRequest, InferResponse, OutputTensor
from server.rpc import fast_infer
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.pb import grpc_service_pb2_grpc as pb_grpc
from server.rpc.registration import add_inference_service

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
FIXED = sorted(name for name in ONNX_TYPES if datatypes.BY_NAME[name].item_size)


def test_the_fast_path_was_compiled() -> None:
    # The set-up compiles it (setup.py); without it every call takes the general path and the tests below
    # would compare the general path with itself.
    assert fast_infer.available(), "server/rpc/_infer_wire.c was not compiled: run scripts/setup.sh"


def _raw_call(channel: grpc.Channel, body: bytes) -> bytes:
    call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
    return call(body, timeout=30)  # type: ignore[no-any-return]


def _identity_request(datatype: str, rows: int, seed: int) -> pb.ModelInferRequest:
    name = datatype.lower()
    dtype = datatypes.BY_NAME[datatype].numpy_dtype
    rng = np.random.default_rng(seed)
    if datatype == "BOOL":
        values = rng.integers(0, 2, rows * 2).astype(bool)
    elif dtype.kind == "f":
        values = rng.standard_normal(rows * 2).astype(dtype)  # finite: NaN payloads are not the point here
    else:
        values = np.frombuffer(rng.bytes(rows * 2 * dtype.itemsize), dtype=dtype)
    message = pb.ModelInferRequest(model_name=f"identity_{name}", id=f"req-{name}")
    message.inputs.add(name=f"in_{name}", datatype=datatype, shape=[rows, 2])
    message.raw_input_contents.append(values.tobytes())
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    return message


@pytest.mark.parametrize("datatype", FIXED)
def test_fast_and_general_paths_answer_the_same_bytes(channel: grpc.Channel, datatype: str) -> None:
    for rows, seed in ((1, 0), (5, 1)):
        message = _identity_request(datatype, rows, seed)
        fast_body = message.SerializeToString()
        assert fast_infer.request_from_bytes(fast_body) is not None  # the server's reader takes it
        message.inputs[0].parameters["ignored"].string_param = "sends this request down the general path"
        general_body = message.SerializeToString()
        assert fast_infer.request_from_bytes(general_body) is None
        fast_answer, general_answer = _raw_call(channel, fast_body), _raw_call(channel, general_body)
        assert fast_answer == general_answer
        response = pb.ModelInferResponse.FromString(fast_answer)
        assert response.id == f"req-{datatype.lower()}"
        assert list(response.outputs[0].shape) == [rows, 2]
        assert response.raw_output_contents[0] == message.raw_input_contents[0]


def test_bytes_requests_take_the_general_path_and_get_the_same_answer_as_typed_contents(channel: grpc.Channel) -> None:
    """BYTES (length-prefixed elements) is left to the general path; its answer is written by the fast writer."""
    from tritonclient.utils import serialize_byte_tensor

    # Text only: ONNX string tensors hold UTF-8.
    values = np.array([b"hello", b"", "\u00fcn\u00efcode".encode(), b"tab\there"], dtype=object)
    raw = pb.ModelInferRequest(model_name="identity_bytes", id="b")
    raw.inputs.add(name="in_bytes", datatype="BYTES", shape=[2, 2])
    raw.raw_input_contents.append(serialize_byte_tensor(values).item())  # one bytes object, length-prefixed
    typed = pb.ModelInferRequest(model_name="identity_bytes", id="b")
    typed.inputs.add(name="in_bytes", datatype="BYTES", shape=[2, 2]).contents.bytes_contents.extend(values)
    assert fast_infer.request_from_bytes(raw.SerializeToString()) is None
    raw_answer = _raw_call(channel, raw.SerializeToString())
    typed_answer = _raw_call(channel, typed.SerializeToString())
    assert raw_answer == typed_answer
    assert pb.ModelInferResponse.FromString(raw_answer).raw_output_contents[0] == raw.raw_input_contents[0]


def test_tritonclient_with_request_parameters_gets_the_right_answer(triton: Any) -> None:
    import tritonclient.grpc as grpcclient

    data = np.arange(6, dtype=np.float32).reshape(3, 2)
    tensor = grpcclient.InferInput("in_fp32", [3, 2], "FP32")
    tensor.set_data_from_numpy(data)
    result = triton.infer("identity_fp32", [tensor], request_id="tc-1", parameters={"custom": 7, "flag": True})
    np.testing.assert_array_equal(result.as_numpy("out_fp32"), data)
    assert result.get_response().id == "tc-1"


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.raw_input_contents.__setitem__(0, m.raw_input_contents[0][:-1]), "bytes of raw contents"),
        (lambda m: m.inputs[0].shape.__setitem__(0, -2), "negative"),
        (lambda m: setattr(m.inputs[0], "datatype", "FP8"), "unknown datatype"),
        (lambda m: setattr(m, "model_name", "no_such_model"), "no_such_model"),
    ],
)
def test_bad_requests_get_the_general_paths_errors(channel: grpc.Channel, edit: Any, needle: str) -> None:
    message = _identity_request("FP32", 2, 0)
    edit(message)
    with pytest.raises(grpc.RpcError) as caught:
        _raw_call(channel, message.SerializeToString())
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert needle in (caught.value.details() or "")
    # The server keeps serving on the fast path.
    good = _identity_request("FP32", 1, 3)
    assert pb.ModelInferResponse.FromString(_raw_call(channel, good.SerializeToString())).id == "req-fp32"


class _Recorder(pb_grpc.GRPCInferenceServiceServicer):
    """A servicer that records what ModelInfer's handler receives and answers with written bytes."""

    def __init__(self) -> None:
        self.received: list[object] = []

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[override]
        self.received.append(request)
        name = request.model_name
        return fast_infer.response_to_bytes(
            InferResponse(name, "1", "", [OutputTensor("y", "INT32", (1,), np.array([42], np.int32))])
        )


async def test_the_handler_receives_the_core_request_and_may_answer_bytes() -> None:
    recorder = _Recorder()
    server = grpc.aio.server()
    add_inference_service(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            common = _identity_request("INT32", 1, 0)
            uncommon = _identity_request("INT32", 1, 0)
            uncommon.inputs[0].contents.int_contents.extend([1, 2])
            uncommon.ClearField("raw_input_contents")
            for message in (common, uncommon):
                response = await asyncio.wait_for(stub.ModelInfer(message), 30)
                assert np.frombuffer(response.raw_output_contents[0], np.int32).tolist() == [42]
    finally:
        await server.stop(None)
    assert isinstance(recorder.received[0], InferRequest)
    assert isinstance(recorder.received[1], pb.ModelInferRequest)
