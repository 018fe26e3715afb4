"""numpy arrays to and from the protocol's tensor contents, written for the client (no server code).

The wire carries a tensor either raw (`raw_input_contents` / `raw_output_contents`: the elements little-endian
in row-major order; BYTES elements each preceded by a 4-byte little-endian length) or typed (`contents`: one
repeated field per element family). Servers may answer in either form, so both decode.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

# Protocol datatype -> numpy dtype, little-endian where it matters (the wire is little-endian everywhere).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# The `contents` field that carries each datatype typed; FP16 has none (it travels raw only).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype for an array's dtype; strings and bytes (and object arrays) are BYTES.

    Raises:
        ValueError: for dtypes the protocol cannot carry (complex, datetime, ...).
    """
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and dtype == array.dtype.newbyteorder("<"):
            return name
    raise ValueError(f"the protocol has no datatype for numpy dtype {array.dtype}")


def _as_bytes(value: object) -> bytes:
    """One BYTES element: bytes as they are, anything else as its UTF-8 text."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.bytes_):
        return bytes(value)
    return str(value).encode()


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    """An array as raw contents of the given datatype (converted to it first)."""
    if datatype == "BYTES":
        parts = []
        for value in np.asarray(array, dtype=object).reshape(-1):
            data = _as_bytes(value)
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def _split_bytes(raw: bytes, name: str) -> list[bytes]:
    """The elements of raw BYTES contents: each one a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise ValueError(f"tensor {name!r}: BYTES contents end inside a length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise ValueError(f"tensor {name!r}: a BYTES element runs past the end of the contents")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _element_count(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


def decode_raw(raw: bytes, datatype: str, shape: Sequence[int], name: str = "") -> np.ndarray:
    """Raw contents as an array of the given shape (BYTES as an object array of bytes).

    Raises:
        ValueError: when the contents do not hold exactly the shape's number of elements.
    """
    shape = tuple(int(d) for d in shape)
    if datatype == "BYTES":
        elements = _split_bytes(raw, name)
        if len(elements) != _element_count(shape):
            raise ValueError(f"tensor {name!r}: {len(elements)} BYTES elements for shape {list(shape)}")
        out = np.empty(len(elements), dtype=object)
        out[:] = elements
        return out.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if len(raw) != _element_count(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: {len(raw)} bytes for {datatype} shape {list(shape)}")
    # Native byte order for the caller; copy so the array owns writable memory.
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def decode_typed(contents: Any, datatype: str, shape: Sequence[int], name: str = "") -> np.ndarray:
    """Typed contents (an InferTensorContents message) as an array of the given shape.

    Raises:
        ValueError: for FP16 (no typed field) or when the element count does not match the shape.
    """
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise ValueError(f"tensor {name!r}: {datatype} has no typed contents")
    values = list(getattr(contents, field))
    shape = tuple(int(d) for d in shape)
    if len(values) != _element_count(shape):
        raise ValueError(f"tensor {name!r}: {len(values)} values for shape {list(shape)}")
    if datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out.reshape(shape)
    return np.asarray(values, dtype=NUMPY_DTYPES[datatype].newbyteorder("=")).reshape(shape)
