"""ModelInfer's bytes-in/bytes-out path: the common request read, and every response written, without protobuf.

ModelInfer is registered with the two functions here as its deserializer and serializer
(registration.py). A request the compiled reader takes (server/rpc/_infer_wire.c: raw
contents of fixed-size types, shapes that match their bytes, parameters on the request only) becomes the
core InferRequest at once, its arrays views over the received bytes; any other request,
including every malformed or invalid one, is parsed by protobuf and converted by
converters.infer_request_from_pb, which words the errors. A response with no parameters is
written by the same module; the bytes equal protobuf's serialisation of the same message
(tests/unit/test_fast_infer.py checks both directions against the general path).

Without the compiled module (no C compiler at install time) every call takes the general path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from server.core import bytes_codec, datatypes
from server.core.types import InferRequest, InferResponse, InputTensor, RequestedOutput
from server.rpc.pb import grpc_service_pb2 as pb

try:
    from server.rpc import _infer_wire
except ImportError:  # built without a C compiler: the general path serves every call
    _infer_wire = None  # type: ignore[assignment]

_NUMPY_DTYPES = {name: t.numpy_dtype for name, t in datatypes.BY_NAME.items() if t.item_size}


def available() -> bool:
    """Whether the compiled reader and writer were built."""
    return _infer_wire is not None


def request_from_bytes(data: bytes) -> InferRequest | None:
    """The core request for a ModelInferRequest the fast path takes; None for the general path."""
    if _infer_wire is None:
        return None
    parsed = _infer_wire.parse_request(data)
    if parsed is None:
        return None
    model_name, model_version, request_id, inputs, outputs, parameters = parsed
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=[
            InputTensor(name, dtype, shape, _view(data, _NUMPY_DTYPES[dtype], offset, count).reshape(shape))
            for name, dtype, shape, offset, count in inputs
        ],
        outputs=[RequestedOutput(name) for name in outputs],
        parameters=parameters,
    )


def _view(data: bytes, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    """`count` elements at `offset` of the request: a read-only view, or a copy when the view would be misaligned.

    Where the contents lie in the message is the sender's choice; a model must never get, say, float64s at an
    odd address (kernels may assume their elements' alignment). The general path copies every input into its own
    bytes object; here only a misaligned one is copied, into its own bytes object likewise.
    """
    array = np.frombuffer(data, dtype, count, offset)
    if array.flags.aligned:
        return array
    return np.frombuffer(data[offset : offset + count * dtype.itemsize], dtype)


def response_to_bytes(response: InferResponse) -> bytes | None:
    """A ModelInferResponse's bytes, as protobuf would write them; None when it has parameters."""
    if _infer_wire is None or response.parameters:
        return None
    outputs = []
    for output in response.outputs:
        data = output.data
        # A C-contiguous array of a fixed-size type is its own raw contents (what tobytes() copies).
        plain = isinstance(data, np.ndarray) and output.datatype != "BYTES" and data.flags.c_contiguous
        contents = data if plain else bytes_codec.encode_raw(data, output.datatype)
        outputs.append((output.name, output.datatype, output.shape, contents))
    try:
        return _infer_wire.encode_response(response.model_name, response.model_version, response.id, outputs)
    except (TypeError, ValueError, OverflowError, BufferError):
        return None  # something unusual in the response (a list shape, an odd array): protobuf writes it


def request_deserializer(general: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """ModelInfer's deserializer: the fast path's InferRequest, else what `general` makes of the bytes."""

    def deserialize(data: bytes) -> object:
        request = request_from_bytes(data)
        return request if request is not None else general(data)

    return deserialize


def serialize_response(response: bytes | pb.ModelInferResponse) -> bytes:
    """ModelInfer's serializer: bytes the fast path wrote pass through; a message is serialised."""
    return response if isinstance(response, bytes) else response.SerializeToString()
