"""Tensors as raw bytes, whatever the transport: fixed-size types as they lie in memory, BYTES length-prefixed.

Both front ends carry tensors this way (gRPC's raw_input_contents, the HTTP binary tensor
extension), so the codec and the size checks that guard it live here, with no protobuf.
"""

from __future__ import annotations

import struct

import numpy as np

from server.core import datatypes
from server.core.errors import InvalidInputError, quoted

_LENGTH = struct.Struct("<I")

# The largest product of a shape's non-zero dimensions. A tensor with elements is bounded
# far below this by the bytes actually received (a request is bounded by the receive limit); the bound
# matters for shapes with a zero dimension, which numpy refuses (ValueError, which would
# answer INTERNAL) once the other dimensions times the item size pass int64.
MAX_ELEMENTS = 1 << 56


def element_count(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def checked_element_count(shape: tuple[int, ...], name: str) -> int:
    """Number of elements of a client's shape, refusing negative dimensions.

    The count is exact (Python ints do not overflow); callers compare it with the bytes
    received before allocating anything, then call refuse_absurd_shape.
    """
    if any(dim < 0 for dim in shape):
        raise InvalidInputError(f"input {quoted(name)} has invalid shape {list(shape)}: a dimension is negative")
    return element_count(shape)


def refuse_absurd_shape(shape: tuple[int, ...], name: str) -> None:
    """Refuses a shape whose non-zero dimensions multiply to more than MAX_ELEMENTS.

    Only an empty tensor can get here with such a shape (a non-empty one has already
    matched the bytes received), and numpy would refuse it with a ValueError.
    """
    nonzero = 1
    for dim in shape:
        if dim:
            nonzero *= dim
    if nonzero > MAX_ELEMENTS:
        raise InvalidInputError(
            f"input {quoted(name)} has invalid shape {list(shape)}: over {MAX_ELEMENTS} elements"
        )


def decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """Splits length-prefixed BYTES contents into a flat object array of `count` elements.

    `count` comes from the client's shape: elements are collected as the bytes hold them
    (each has a 4-byte length prefix, so the list is bounded by what was received) and the
    array is made only once their number matches `count`.
    """
    items: list[bytes] = []
    view = memoryview(raw)
    offset, total = 0, len(raw)
    while offset < total:
        index = len(items)
        if index >= count:
            raise InvalidInputError(f"input {quoted(name)} holds more than the {count} BYTES element(s) its shape has")
        if offset + 4 > total:
            raise InvalidInputError(f"input {quoted(name)} ends inside a BYTES length prefix")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidInputError(f"input {quoted(name)} BYTES element {index} runs past the end of its contents")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidInputError(f"input {quoted(name)} holds {len(items)} BYTES element(s); its shape needs {count}")
    out = np.empty(count, dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def encode_bytes(data: np.ndarray) -> bytes:
    """Serialises an object array of bytes/str as length-prefixed elements, row-major."""
    parts = []
    for item in data.reshape(-1):
        value = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def decode_raw(raw: bytes, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor from raw contents; fixed-size types are a zero-copy view over `raw`."""
    dtype = datatypes.BY_NAME[datatype]
    count = checked_element_count(shape, name)
    if datatype == "BYTES":
        flat = decode_bytes(raw, count, name)
    else:
        expected = count * dtype.item_size
        if len(raw) != expected:
            raise InvalidInputError(
                f"input {quoted(name)} has {len(raw)} bytes of raw contents; {datatype} shape {list(shape)} "
                f"needs {expected}"
            )
        flat = np.frombuffer(raw, dtype=dtype.numpy_dtype)
    refuse_absurd_shape(shape, name)
    return flat.reshape(shape)



def encode_raw(data: np.ndarray, datatype: str) -> bytes:
    """Raw contents of an output tensor."""
    if datatype == "BYTES":
        return encode_bytes(data)
    return np.ascontiguousarray(data).tobytes()
