"""The protocol's datatype strings and their numpy, ONNX and model-config equivalents."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataType:
    """One tensor element type as every layer names it.

    Attributes:
        name: Protocol string ("FP32", "BYTES", ...).
        config_name: Model-config enum name ("TYPE_FP32", "TYPE_STRING", ...).
        onnx_name: ONNX Runtime's type string ("tensor(float)", ...).
        numpy_dtype: The numpy dtype of a tensor of this type (object for BYTES).
        item_size: Bytes per element in raw contents; 0 for variable-size BYTES.
        contents_field: The InferTensorContents field that carries it typed, or "" if
            it may only travel raw (FP16).
    """

    name: str
    config_name: str
    onnx_name: str
    numpy_dtype: np.dtype
    item_size: int
    contents_field: str


_TYPES = [
    DataType("BOOL", "TYPE_BOOL", "tensor(bool)", np.dtype(np.bool_), 1, "bool_contents"),
    DataType("UINT8", "TYPE_UINT8", "tensor(uint8)", np.dtype(np.uint8), 1, "uint_contents"),
    DataType("UINT16", "TYPE_UINT16", "tensor(uint16)", np.dtype(np.uint16), 2, "uint_contents"),
    DataType("UINT32", "TYPE_UINT32", "tensor(uint32)", np.dtype(np.uint32), 4, "uint_contents"),
    DataType("UINT64", "TYPE_UINT64", "tensor(uint64)", np.dtype(np.uint64), 8, "uint64_contents"),
    DataType("INT8", "TYPE_INT8", "tensor(int8)", np.dtype(np.int8), 1, "int_contents"),
    DataType("INT16", "TYPE_INT16", "tensor(int16)", np.dtype(np.int16), 2, "int_contents"),
    DataType("INT32", "TYPE_INT32", "tensor(int32)", np.dtype(np.int32), 4, "int_contents"),
    DataType("INT64", "TYPE_INT64", "tensor(int64)", np.dtype(np.int64), 8, "int64_contents"),
    DataType("FP16", "TYPE_FP16", "tensor(float16)", np.dtype(np.float16), 2, ""),
    DataType("FP32", "TYPE_FP32", "tensor(float)", np.dtype(np.float32), 4, "fp32_contents"),
    DataType("FP64", "TYPE_FP64", "tensor(double)", np.dtype(np.float64), 8, "fp64_contents"),
    DataType("BYTES", "TYPE_STRING", "tensor(string)", np.dtype(object), 0, "bytes_contents"),
]

BY_NAME: dict[str, DataType] = {t.name: t for t in _TYPES}
BY_CONFIG_NAME: dict[str, DataType] = {t.config_name: t for t in _TYPES}
BY_ONNX_NAME: dict[str, DataType] = {t.onnx_name: t for t in _TYPES}


def from_numpy(dtype: np.dtype) -> DataType:
    """Returns the protocol type of a numpy array's dtype.

    Raises:
        KeyError: for dtypes the protocol cannot carry.
    """
    if dtype.kind in ("O", "S", "U"):
        return BY_NAME["BYTES"]
    for t in _TYPES:
        if t.numpy_dtype == dtype:
            return t
    raise KeyError(f"no protocol datatype for numpy dtype {dtype}")
