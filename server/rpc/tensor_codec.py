"""The protocol's typed tensor contents (InferTensorContents); raw contents are server.core.bytes_codec's."""

from __future__ import annotations

from typing import Any

import numpy as np

from server.core import datatypes
from server.core.bytes_codec import checked_element_count, decode_raw, encode_raw, refuse_absurd_shape
from server.core.errors import InvalidInputError, quoted

# decode_raw and encode_raw are re-exported: clients/predict.py reads them from here.
__all__ = ["decode_raw", "decode_typed", "encode_raw"]


def decode_typed(contents: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A tensor from the InferTensorContents field that matches its datatype."""
    dtype = datatypes.BY_NAME[datatype]
    if not dtype.contents_field:
        raise InvalidInputError(f"input {quoted(name)} is {datatype}, which must be sent in raw_input_contents")
    for field_desc, _ in contents.ListFields():
        if field_desc.name != dtype.contents_field:
            raise InvalidInputError(
                f"input {quoted(name)} is {datatype} but sets contents.{field_desc.name}; "
                f"use contents.{dtype.contents_field}"
            )
    values = getattr(contents, dtype.contents_field)
    count = checked_element_count(shape, name)
    # Compared before anything is allocated: the typed field's length is what was received.
    if len(values) != count:
        raise InvalidInputError(f"input {quoted(name)} has {len(values)} element(s); shape {list(shape)} needs {count}")
    refuse_absurd_shape(shape, name)
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        for i, value in enumerate(values):
            out[i] = bytes(value)
        return out.reshape(shape)
    if dtype.numpy_dtype.kind in "iu" and dtype.item_size < 8 and count:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype.numpy_dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInputError(f"input {quoted(name)} has values outside the {datatype} range")
        return wide.astype(dtype.numpy_dtype).reshape(shape)
    return np.asarray(values, dtype=dtype.numpy_dtype).reshape(shape)
