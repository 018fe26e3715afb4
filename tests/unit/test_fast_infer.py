"""The ModelInfer fast path (server/rpc/_infer_wire.c, fast_infer.py) against the general protobuf path.

The contract: for any bytes, the fast reader either declines (None) or produces exactly the
InferRequest that protobuf parsing plus converters.infer_request_from_pb produces; and it
declines every request the general path refuses, so errors are always the general path's.
The writer produces exactly protobuf's serialisation of the same response.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import numpy as np
import pytest

from server.core import datatypes
from server.core.errors import InvalidInputError
from server.core.types import InferRequest, InferResponse, OutputTensor
from server.rpc import converters, fast_infer
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.registration import _safe_deserializer, model_infer_codec
from server.rpc.status import MalformedRequest

FIXED = sorted(name for name, t in datatypes.BY_NAME.items() if t.item_size)
SHAPES = [(), (1,), (1, 2), (3, 1, 2), (2, 3, 4), (1,) * 32]


def test_the_fast_path_was_compiled() -> None:
    # The set-up compiles it (setup.py); without it every call takes the general path and the tests below
    # would compare the general path with itself.
    assert fast_infer.available(), "server/rpc/_infer_wire.c was not compiled: run scripts/setup.sh"


def _general(data: bytes) -> InferRequest | None:
    """What the general path makes of the bytes; None where it refuses them."""
    try:
        message = pb.ModelInferRequest.FromString(data)
    except Exception:
        return None
    try:
        return converters.infer_request_from_pb(message)
    except InvalidInputError:
        return None


def _values(datatype: str, count: int, rng: np.random.Generator) -> np.ndarray:
    dtype = datatypes.BY_NAME[datatype].numpy_dtype
    if datatype == "BOOL":
        return rng.integers(0, 2, count).astype(bool)
    return np.frombuffer(rng.bytes(count * dtype.itemsize), dtype=dtype)


def _request(
    shapes: list[tuple[int, ...]], types: list[str], seed: int = 0, **fields: Any
) -> pb.ModelInferRequest:
    rng = np.random.default_rng(seed)
    message = pb.ModelInferRequest(model_name="m", **fields)
    for index, (shape, datatype) in enumerate(zip(shapes, types, strict=True)):
        message.inputs.add(name=f"in{index}", datatype=datatype, shape=shape)
        count = int(np.prod(shape)) if shape else 1
        message.raw_input_contents.append(_values(datatype, count, rng).tobytes())
    return message


def _assert_same(fast: InferRequest, general: InferRequest) -> None:
    assert (fast.model_name, fast.model_version, fast.id) == (general.model_name, general.model_version, general.id)
    assert fast.outputs == general.outputs
    assert fast.parameters == general.parameters
    assert {k: type(v) for k, v in fast.parameters.items()} == {k: type(v) for k, v in general.parameters.items()}
    assert len(fast.inputs) == len(general.inputs)
    for mine, theirs in zip(fast.inputs, general.inputs, strict=True):
        assert (mine.name, mine.datatype, mine.shape) == (theirs.name, theirs.datatype, theirs.shape)
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape
        assert mine.data.tobytes() == theirs.data.tobytes()
        assert not mine.data.flags.writeable  # a view over the received bytes, as the general path's


def _same_or_declined(data: bytes) -> bool:
    """The contract for any bytes; returns whether the fast path took them."""
    fast = fast_infer.request_from_bytes(data)
    general = _general(data)
    if fast is None:
        return False
    assert general is not None, "the fast path accepted bytes the general path refuses"
    _assert_same(fast, general)
    return True


@pytest.mark.parametrize("datatype", FIXED)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_fixed_datatype_and_shape_reads_as_the_general_path(datatype: str, shape: tuple[int, ...]) -> None:
    assert _same_or_declined(_request([shape], [datatype]).SerializeToString())


def test_several_inputs_outputs_and_ids_read_as_the_general_path() -> None:
    message = _request([(2, 2), (1,), (4, 1)], ["FP32", "INT64", "UINT8"], model_version="3", id="req-é")
    message.outputs.add(name="out0")
    message.outputs.add(name="out1")
    assert _same_or_declined(message.SerializeToString())
    assert _same_or_declined(_request([(1,)] * 16, ["FP16"] * 16).SerializeToString())


def test_request_parameters_of_every_kind_read_as_the_general_path() -> None:
    message = _request([(1, 2)], ["FP32"])
    message.parameters["flag"].bool_param = True
    message.parameters["off"].bool_param = False
    message.parameters["neg"].int64_param = -(1 << 62)
    message.parameters["big"].uint64_param = (1 << 64) - 1
    message.parameters["real"].double_param = -2.5e-300
    message.parameters["text"].string_param = "naïve ✓"
    message.parameters["empty"].string_param = ""
    message.parameters["unset"].SetInParent()  # an InferParameter with no value: left out by both
    message.parameters["priority"].uint64_param = 0
    fast = fast_infer.request_from_bytes(message.SerializeToString())
    assert fast is not None and fast.parameters["flag"] is True and "unset" not in fast.parameters
    assert _same_or_declined(message.SerializeToString())


def _entry(key: bytes, value: bytes | None) -> bytes:
    body = b"\x0a" + bytes([len(key)]) + key
    if value is not None:
        body += b"\x12" + bytes([len(value)]) + value
    return b"\x22" + bytes([len(body)]) + body


def test_repeated_parameter_keys_and_oneof_members_take_the_last_as_protobuf_does() -> None:
    base = _request([(1,)], ["INT32"]).SerializeToString()
    int_7 = b"\x10\x07"
    string_x = b"\x1a\x01x"
    double_1 = b"\x21" + struct.pack("<d", 1.0)
    cases = [
        _entry(b"k", int_7) + _entry(b"k", string_x),  # the last entry wins
        _entry(b"k", int_7) + _entry(b"k", b""),  # ... even when it sets nothing: absent
        _entry(b"k", int_7 + string_x + double_1),  # the last oneof member wins
        _entry(b"k", None),  # no value at all
        _entry(b"", b"\x08\x01"),  # an empty key
        _entry(b"k", b"\x08\xff\x01"),  # bool from a varint above 1
    ]
    for extra in cases:
        assert _same_or_declined(base + extra), extra


def _typed_contents(message: pb.ModelInferRequest) -> None:
    message.inputs[0].contents.fp32_contents.extend([0.0, 0.0])
    message.ClearField("raw_input_contents")


def _seventeen_inputs(message: pb.ModelInferRequest) -> None:
    for index in range(16):
        message.inputs.add(name=f"x{index}", datatype="FP32", shape=[1])
        message.raw_input_contents.append(b"\0" * 4)


# Each edits a valid one-input FP32 [1, 2] request.
DECLINED: dict[str, Any] = {
    "typed contents": _typed_contents,
    "input parameters": lambda m: setattr(m.inputs[0].parameters["p"], "int64_param", 1),
    "output parameters": lambda m: setattr(m.outputs.add(name="o").parameters["classification"], "int64_param", 2),
    "no raw contents": lambda m: m.ClearField("raw_input_contents"),
    "one raw too many": lambda m: m.raw_input_contents.append(b""),
    "a zero dimension": lambda m: m.inputs[0].shape.__setitem__(0, 0),
    "a negative dimension": lambda m: m.inputs[0].shape.__setitem__(0, -1),
    "too few bytes": lambda m: m.raw_input_contents.__setitem__(0, m.raw_input_contents[0][:-1]),
    "too many bytes": lambda m: m.raw_input_contents.__setitem__(0, m.raw_input_contents[0] + b"\0"),
    "BYTES": lambda m: setattr(m.inputs[0], "datatype", "BYTES"),
    "an unknown datatype": lambda m: setattr(m.inputs[0], "datatype", "FP8"),
    "a lower-case datatype": lambda m: setattr(m.inputs[0], "datatype", "fp32"),
    "no name": lambda m: setattr(m.inputs[0], "name", ""),
    "33 dimensions": lambda m: m.inputs[0].shape.extend([1] * 31),
    "no inputs": lambda m: (m.ClearField("inputs"), m.ClearField("raw_input_contents")),
    "17 inputs": _seventeen_inputs,
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_uncommon_and_invalid_requests_are_declined(case: str) -> None:
    message = _request([(1, 2)], ["FP32"])
    DECLINED[case](message)
    data = message.SerializeToString()
    assert fast_infer.request_from_bytes(data) is None
    # The deserializer hands them to protobuf: the handler then gets the message (or the parse failure).
    deserialize, _ = model_infer_codec()
    assert isinstance(deserialize(data), pb.ModelInferRequest)


# One FP32 [2] input "x" with its 8 bytes, after model_name "m".
_FP32_INPUT = b"\x0a\x01m\x2a\x0c\x0a\x01x\x12\x04FP32\x1a\x01\x02\x3a\x08" + bytes(8)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x02\xff\xfe",  # model_name that is not UTF-8
        b"\x0a\x05ab",  # a length past the end
        b"\x08\x01",  # a varint where a string belongs
        b"\x0a",  # a tag with nothing after it
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint longer than ten bytes
        b"\x00\x00",  # field number 0
        b"\x3a\x00\x2a\x02\x0a\x00",  # an input whose name is empty
    ],
)
def test_malformed_bytes_are_declined_and_keep_the_general_paths_answer(data: bytes) -> None:
    assert fast_infer.request_from_bytes(data) is None
    deserialize, _ = model_infer_codec()
    result = deserialize(data)
    assert isinstance(result, MalformedRequest | pb.ModelInferRequest)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x01\xff\x0a\x01m" + _FP32_INPUT,  # model_name
        b"\x1a\x01\xff\x1a\x01i" + _FP32_INPUT,  # id
        b"\x0a\x01m\x2a\x0f\x0a\x01\xff\x0a\x01x\x12\x04FP32\x1a\x01\x02\x3a\x08" + bytes(8),  # input name
        b"\x0a\x01m\x2a\x0f\x0a\x01x\x12\x01\xff\x12\x04FP32\x1a\x01\x02\x3a\x08" + bytes(8),  # datatype
        b"\x32\x06\x0a\x01\xff\x0a\x01o" + _FP32_INPUT,  # a requested output's name
        b"\x22\x0a\x0a\x01\xff\x0a\x01k\x12\x02\x08\x01" + _FP32_INPUT,  # a parameter's key
    ],
)
def test_a_string_given_twice_with_a_first_copy_that_is_not_utf8_is_declined(data: bytes) -> None:
    """Protobuf checks every copy of a string field and refuses these; the fast path keeps only the last copy, so
    it declines any string field given twice rather than serve what the general path refuses."""
    assert isinstance(_safe_deserializer(pb.ModelInferRequest)(data), MalformedRequest)
    assert fast_infer.request_from_bytes(data) is None
    repaired = data.replace(b"\xff", b"z")  # the same request with valid copies: protobuf takes it, the fast path not
    pb.ModelInferRequest.FromString(repaired)  # raises if the bytes were malformed for another reason
    assert fast_infer.request_from_bytes(repaired) is None


def test_every_prefix_and_byte_mutation_is_either_declined_or_read_as_the_general_path() -> None:
    message = _request([(2, 3), (1,)], ["FP32", "INT8"], model_version="1", id="abc")
    message.outputs.add(name="out")
    message.parameters["n"].int64_param = 5
    message.parameters["s"].string_param = "v"
    data = message.SerializeToString()
    taken = sum(_same_or_declined(data[:end]) for end in range(len(data) + 1))
    assert taken >= 1  # the whole request at least
    rng = random.Random(15)
    taken = 0
    for _ in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        taken += _same_or_declined(bytes(mutated))
    assert taken >= 300  # most mutations land in the contents, which both paths take as they are


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "FP16"])
def test_inputs_are_aligned_wherever_the_sender_put_them(datatype: str) -> None:
    for padding in range(8):
        # The model name's length moves the raw contents to every offset modulo 8.
        message = _request([(2, 3)], [datatype], seed=padding)
        message.model_name = "m" * (padding + 1)
        data = message.SerializeToString()
        fast = fast_infer.request_from_bytes(data)
        assert fast is not None
        array = fast.inputs[0].data
        assert array.flags.aligned and array.ctypes.data % array.dtype.alignment == 0
        assert not array.flags.writeable
        assert _same_or_declined(data)


def test_packed_and_unpacked_shapes_read_the_same() -> None:
    packed = _request([(2, 3)], ["FP32"]).SerializeToString()
    # The same request with the shape as one varint field per dimension (what some encoders write).
    message = _request([(2, 3)], ["FP32"])
    inputs = message.inputs[0]
    body = b"\x0a" + bytes([len(inputs.name)]) + inputs.name.encode() + b"\x12\x04FP32" + b"\x18\x02\x18\x03"
    unpacked = b"\x0a\x01m" + b"\x2a" + bytes([len(body)]) + body
    unpacked += b"\x3a" + bytes([len(message.raw_input_contents[0])]) + message.raw_input_contents[0]
    fast_packed, fast_unpacked = fast_infer.request_from_bytes(packed), fast_infer.request_from_bytes(unpacked)
    assert fast_packed is not None and fast_unpacked is not None
    assert fast_unpacked.inputs[0].shape == (2, 3) == fast_packed.inputs[0].shape
    assert _same_or_declined(unpacked)


# ---- the response writer ----


def _output(name: str, datatype: str, data: np.ndarray) -> OutputTensor:
    return OutputTensor(name, datatype, tuple(data.shape), data)


def _assert_written_as_protobuf(response: InferResponse) -> None:
    written = fast_infer.response_to_bytes(response)
    assert written is not None
    assert written == converters.infer_response_to_pb(response).SerializeToString()
    assert fast_infer.serialize_response(written) is written


@pytest.mark.parametrize("datatype", FIXED)
def test_every_fixed_datatype_is_written_as_protobuf_writes_it(datatype: str) -> None:
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        count = int(np.prod(shape)) if shape else 1
        data = _values(datatype, count, rng).reshape(shape)
        _assert_written_as_protobuf(InferResponse("model", "1", "id-1", [_output("out", datatype, data)]))


def test_an_output_that_is_not_an_array_is_written_by_protobuf_and_the_same() -> None:
    response = InferResponse("m", "1", "", [OutputTensor("o", "INT32", (2,), [1, 2])])  # type: ignore[arg-type]
    assert fast_infer.response_to_bytes(response) == converters.infer_response_to_pb(response).SerializeToString()


def test_bytes_outputs_empty_fields_and_odd_arrays_are_written_as_protobuf_writes_them() -> None:
    text = np.array([b"hello", b"", "ünï".encode()], dtype=object)
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    cases = [
        InferResponse("m", "", "", [_output("t", "BYTES", text)]),
        InferResponse("", "", "", []),
        InferResponse("m", "7", "", [_output("a", "FP32", matrix), _output("b", "INT64", np.zeros((0, 3), np.int64))]),
        InferResponse("m", "7", "x", [_output("transposed", "FP32", matrix.T)]),  # not C-contiguous
        InferResponse("m", "7", "x", [_output("big-endian", "FP32", matrix.astype(">f4"))]),
        InferResponse("m", "7", "x", [OutputTensor("wide", "INT32", (1 << 40, 0), np.zeros((0,), np.int32))]),
        InferResponse("m" * 300, "v" * 200, "i" * 1000, [_output("large", "FP64", np.ones((64, 512)))]),
    ]
    for response in cases:
        _assert_written_as_protobuf(response)


def test_a_response_with_parameters_goes_to_protobuf() -> None:
    outputs = [_output("o", "FP32", np.ones(2, np.float32))]
    response = InferResponse("m", "1", "", outputs, {"triton_final_response": True})
    assert fast_infer.response_to_bytes(response) is None
    assert fast_infer.serialize_response(converters.infer_response_to_pb(response)) == (
        converters.infer_response_to_pb(response).SerializeToString()
    )


def test_without_the_compiled_module_everything_takes_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _request([(1, 2)], ["FP32"]).SerializeToString()
    monkeypatch.setattr(fast_infer, "_infer_wire", None)
    assert not fast_infer.available()
    assert fast_infer.request_from_bytes(data) is None
    assert fast_infer.response_to_bytes(InferResponse("m", "1", "")) is None
    deserialize, _ = model_infer_codec()
    assert isinstance(deserialize(data), pb.ModelInferRequest)


def test_reading_and_writing_leak_nothing() -> None:
    """Every path through the C code, taken and declined, a few hundred thousand times: the peak memory stays put
    (a leak of even one small object per call would show as tens of megabytes)."""
    import resource

    message = _request([(1, 256)], ["FP32"], id="x")
    message.outputs.add(name="out")
    for key, kind, value in (("a", "bool_param", True), ("b", "string_param", "s"), ("c", "double_param", 1.5),
                             ("d", "int64_param", -3), ("e", "uint64_param", 7)):
        setattr(message.parameters[key], kind, value)
    good = message.SerializeToString()
    rng = random.Random(7)
    declined = [good[:-3], good + _entry(b"k", b"\x08\x01") + _entry(b"k", b"")]
    for _ in range(100):
        mutated = bytearray(good)
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        declined.append(bytes(mutated))
    response = InferResponse("m", "1", "id", [
        _output("o", "FP32", np.ones((1, 10), np.float32)), _output("t", "BYTES", np.array([b"a", b"b"], object)),
    ])
    refused = [("o", "FP32", (1, "x"), b"1234"), ("o", "FP32", (1,), 5), ("o", 3, (1,), b"")]

    def exercise(rounds: int) -> None:
        for _ in range(rounds):
            assert fast_infer.request_from_bytes(good) is not None
            for data in declined:
                fast_infer.request_from_bytes(data)
            assert fast_infer.response_to_bytes(response) is not None
            for output in refused:
                with pytest.raises((TypeError, ValueError, OverflowError, BufferError)):
                    fast_infer._infer_wire.encode_response("m", "", "", [output])

    exercise(300)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exercise(3000)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 16 * 1024, f"peak memory grew {grown_kib} KiB over ~300,000 calls"
