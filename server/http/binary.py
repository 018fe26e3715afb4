"""KServe v2 REST inference bodies: JSON tensors and Triton's binary tensor extension.

A request body is a JSON object, optionally followed by the raw bytes of some inputs; the
`Inference-Header-Content-Length` header says where the JSON ends. An input carried in the
binary part has a `binary_data_size` parameter instead of `data`; the sizes, in input order,
must add up to exactly the bytes after the JSON. The raw bytes use the same codec as gRPC's
raw contents (core/bytes_codec.py: fixed-size types as they lie in memory, BYTES with a
4-byte little-endian length prefix). An output is returned in binary when its `binary_data`
parameter (or the request's `binary_data_output`) says so; the response then carries the
same header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from server.core import bytes_codec, datatypes
from server.core.errors import InvalidInputError, quoted
from server.core.types import InferRequest, InferResponse, InputTensor, ParamValue, RequestedOutput
from server.logs import adopt_request_id

HEADER_LENGTH = "Inference-Header-Content-Length"
# The most dimensions of a tensor's shape (as on gRPC), which also bounds the nesting of `data`.
MAX_DIMS = 32
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# Request parameters that steer this codec and are not the model's business.
_CODEC_PARAMETERS = ("binary_data_output",)


@dataclass
class DecodedRequest:
    """An inference request and how its outputs are to be returned."""

    request: InferRequest
    binary_default: bool
    binary_outputs: dict[str, bool]


def parse_json(data: bytes | memoryview, what: str = "request body") -> Any:
    """A JSON document; InvalidInputError when it does not parse."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {quoted(exc, 200)}") from exc


def header_length(value: str | None, body_length: int) -> int:
    """Where the JSON ends: the Inference-Header-Content-Length header, or the whole body."""
    if value is None:
        return body_length
    if not value.isascii() or not value.isdigit():
        raise InvalidInputError(f"{HEADER_LENGTH} must be a non-negative integer, got {quoted(value)}")
    length = int(value)
    if length > body_length:
        raise InvalidInputError(f"{HEADER_LENGTH} is {length} but the body has only {body_length} bytes")
    return length


def parameters_from_json(value: Any, where: str) -> dict[str, ParamValue]:
    """A `parameters` object: each value a bool, an int64, a finite number or a string."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a JSON object")
    out: dict[str, ParamValue] = {}
    for key, item in value.items():
        if isinstance(item, int) and not isinstance(item, bool) and not _INT64_MIN <= item <= _INT64_MAX:
            raise InvalidInputError(f"{where}.{quoted(key)} is out of the int64 range")
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidInputError(f"{where}.{quoted(key)} must be a bool, a number or a string")
        out[key] = item
    return out


def decode_infer_request(body: bytes, header_value: str | None, model_name: str, model_version: str) -> DecodedRequest:
    """Decodes a POST .../infer body (JSON, maybe followed by binary tensors).

    Raises:
        InvalidInputError: malformed JSON, a bad header length, binary sizes that do not add
            up, unknown datatypes, `data` that does not match the shape, values of the wrong type.
    """
    view = memoryview(body)
    json_length = header_length(header_value, len(body))
    document = parse_json(view[:json_length])
    if not isinstance(document, dict):
        raise InvalidInputError("request body must be a JSON object")
    binary = view[json_length:]
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInputError("request 'id' must be a string")
    adopt_request_id(request_id)  # before the tensors: a request refused for them is logged under its id
    parameters = parameters_from_json(document.get("parameters"), "parameters")
    binary_default = parameters.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInputError("parameter 'binary_data_output' must be true or false")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInputError("request body must have an 'inputs' list")
    inputs = []
    offset = 0
    for index, tensor in enumerate(raw_inputs):
        decoded, used = _decode_input(tensor, index, binary[offset:])
        offset += used
        inputs.append(decoded)
    if offset != len(binary):
        raise InvalidInputError(
            f"the inputs' binary_data_size add up to {offset} bytes but {len(binary)} follow the JSON header"
        )
    outputs, binary_outputs = _decode_outputs(document.get("outputs"))
    request = InferRequest(model_name, model_version, request_id, inputs, outputs, parameters)
    return DecodedRequest(request, binary_default, binary_outputs)


def _decode_input(tensor: Any, index: int, binary: memoryview) -> tuple[InputTensor, int]:
    """One input, and how many bytes of the binary part it took."""
    if not isinstance(tensor, dict):
        raise InvalidInputError(f"input {index} must be a JSON object")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"input {index} has no name")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in datatypes.BY_NAME:
        raise InvalidInputError(
            f"input {quoted(name)} has unknown datatype {quoted(datatype)}; "
            f"expected one of {', '.join(datatypes.BY_NAME)}"
        )
    shape_value = tensor.get("shape")
    if (
        not isinstance(shape_value, list)
        or len(shape_value) > MAX_DIMS
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and _INT64_MIN <= d <= _INT64_MAX for d in shape_value
        )
    ):
        raise InvalidInputError(f"input {quoted(name)} must have a 'shape': a list of at most {MAX_DIMS} integers")
    shape = tuple(shape_value)
    params = parameters_from_json(tensor.get("parameters"), f"input {quoted(name)} parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInputError(f"input {quoted(name)} binary_data_size must be a non-negative integer")
        if "data" in tensor:
            raise InvalidInputError(f"input {quoted(name)} has both 'data' and binary_data_size")
        if size > len(binary):
            raise InvalidInputError(
                f"input {quoted(name)} binary_data_size is {size} but only {len(binary)} bytes of binary data are left"
            )
        data = bytes_codec.decode_raw(bytes(binary[:size]), datatype, shape, name)
        return InputTensor(name, datatype, shape, data), size
    if "data" not in tensor:
        raise InvalidInputError(f"input {quoted(name)} has neither 'data' nor binary_data_size")
    data = decode_json_data(tensor["data"], datatype, shape, name)
    return InputTensor(name, datatype, shape, data), 0


def decode_json_data(value: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor from JSON `data`, nested or flat, in row-major order.

    Raises:
        InvalidInputError: the element count differs from the shape's, or an element is not
            of the datatype (a string for BYTES, true/false for BOOL, a number in range otherwise).
    """
    count = bytes_codec.checked_element_count(shape, name)
    flat: list[Any] = []
    _flatten(value, flat, 0, name)
    if len(flat) != count:
        raise InvalidInputError(
            f"input {quoted(name)} has {len(flat)} element(s) in 'data'; shape {list(shape)} needs {count}"
        )
    bytes_codec.refuse_absurd_shape(shape, name)
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise InvalidInputError(f"input {quoted(name)} is BYTES: every element of 'data' must be a string")
        out = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            out[i] = item.encode("utf-8")
        return out.reshape(shape)
    if datatype == "BOOL":
        if not all(isinstance(item, bool) for item in flat):
            raise InvalidInputError(f"input {quoted(name)} is BOOL: every element of 'data' must be true or false")
    else:
        integer = datatype.startswith(("INT", "UINT"))
        allowed = int if integer else (int, float)
        if not all(isinstance(item, allowed) and not isinstance(item, bool) for item in flat):
            kind = "an integer" if integer else "a number"
            raise InvalidInputError(f"input {quoted(name)} is {datatype}: every element of 'data' must be {kind}")
    try:
        return np.array(flat, dtype=datatypes.BY_NAME[datatype].numpy_dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise InvalidInputError(f"input {quoted(name)} has a value out of the {datatype} range") from exc


def _flatten(value: Any, out: list[Any], depth: int, name: str) -> None:
    if not isinstance(value, list):
        out.append(value)
        return
    if depth >= MAX_DIMS:
        raise InvalidInputError(f"input {quoted(name)} 'data' is nested more than {MAX_DIMS} levels deep")
    for item in value:
        if isinstance(item, list):
            _flatten(item, out, depth + 1, name)
        else:
            out.append(item)


def _decode_outputs(value: Any) -> tuple[list[RequestedOutput], dict[str, bool]]:
    if value is None:
        return [], {}
    if not isinstance(value, list):
        raise InvalidInputError("'outputs' must be a list")
    outputs, binary = [], {}
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInputError(f"output {index} must be a JSON object with a 'name'")
        name = item["name"]
        params = parameters_from_json(item.get("parameters"), f"output {quoted(name)} parameters")
        count = params.get("classification", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidInputError(f"output {quoted(name)} classification must be a non-negative integer")
        flag = params.get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise InvalidInputError(f"output {quoted(name)} binary_data must be true or false")
            binary[name] = flag
        outputs.append(RequestedOutput(name, count))
    return outputs, binary


def encode_infer_response(
    response: InferResponse, binary_default: bool, binary_outputs: dict[str, bool]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    tensors = []
    chunks = []
    for output in response.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary_outputs.get(output.name, binary_default):
            raw = bytes_codec.encode_raw(output.data, output.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = json_data(output.data, output.datatype)
        tensors.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = tensors
    header = orjson.dumps(document)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def json_data(data: np.ndarray, datatype: str) -> list[Any]:
    """A tensor's elements as a flat JSON list (BYTES as text; bytes that are not UTF-8 are replaced)."""
    flat = data.reshape(-1)
    if datatype == "BYTES":
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in flat
        ]
    values: list[Any] = flat.tolist()
    return values
