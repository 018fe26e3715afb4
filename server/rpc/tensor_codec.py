"""The protocol's tensor encodings: raw bytes (BYTES with 4-byte length prefixes) and typed contents."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from server.core import datatypes
from server.core.errors import InvalidInputError

_LENGTH = struct.Struct("<I")


def element_count(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """Splits length-prefixed BYTES contents into a flat object array of `count` elements."""
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset, index, total = 0, 0, len(raw)
    while offset < total:
        if index >= count:
            raise InvalidInputError(f"input '{name}' holds more than the {count} BYTES element(s) its shape has")
        if offset + 4 > total:
            raise InvalidInputError(f"input '{name}' ends inside a BYTES length prefix")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidInputError(f"input '{name}' BYTES element {index} runs past the end of its contents")
        out[index] = bytes(view[offset : offset + length])
        offset += length
        index += 1
    if index != count:
        raise InvalidInputError(f"input '{name}' holds {index} BYTES element(s); its shape needs {count}")
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
    count = element_count(shape)
    if datatype == "BYTES":
        return decode_bytes(raw, count, name).reshape(shape)
    expected = count * dtype.item_size
    if len(raw) != expected:
        raise InvalidInputError(
            f"input '{name}' has {len(raw)} bytes of raw contents; {datatype} shape {list(shape)} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype.numpy_dtype).reshape(shape)


def decode_typed(contents: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor from the InferTensorContents field that matches its datatype."""
    dtype = datatypes.BY_NAME[datatype]
    if not dtype.contents_field:
        raise InvalidInputError(f"input '{name}' is {datatype}, which must be sent in raw_input_contents")
    for field_desc, _ in contents.ListFields():
        if field_desc.name != dtype.contents_field:
            raise InvalidInputError(
                f"input '{name}' is {datatype} but sets contents.{field_desc.name}; use contents.{dtype.contents_field}"
            )
    values = getattr(contents, dtype.contents_field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInputError(f"input '{name}' has {len(values)} element(s); shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        for i, value in enumerate(values):
            out[i] = bytes(value)
        return out.reshape(shape)
    if dtype.numpy_dtype.kind in "iu" and dtype.item_size < 8 and count:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype.numpy_dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInputError(f"input '{name}' has values outside the {datatype} range")
        return wide.astype(dtype.numpy_dtype).reshape(shape)
    return np.asarray(values, dtype=dtype.numpy_dtype).reshape(shape)


def encode_raw(data: np.ndarray, datatype: str) -> bytes:
    """Raw contents of an output tensor."""
    if datatype == "BYTES":
        return encode_bytes(data)
    return np.ascontiguousarray(data).tobytes()
