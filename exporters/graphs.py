"""Hand-built ONNX graphs for what PyTorch cannot export (string tensors, unsigned types)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from exporters.export import ExportSpec, build_config, write_model

# ONNX Runtime 1.20+ reads IR 10; newer onnx releases default to a higher IR.
IR_VERSION = 10
OPSET = 17

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity_model(datatypes: list[str], dims: list[int | str]) -> onnx.ModelProto:
    """One Identity per datatype: input `in_<TYPE>` -> output `out_<TYPE>`, each of shape dims."""
    nodes, inputs, outputs = [], [], []
    for datatype in datatypes:
        name = datatype.lower()
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", ONNX_TYPES[datatype], dims))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", ONNX_TYPES[datatype], dims))
    graph = helper.make_graph(nodes, "identity", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def suffix_model(suffix: str = "!") -> onnx.ModelProto:
    """Strings [B, N] -> each string with `suffix` appended (StringConcat, opset 20)."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["suffix"], value=helper.make_tensor("s", TensorProto.STRING, [], [suffix.encode()])
            ),
            helper.make_node("StringConcat", ["text", "suffix"], ["joined"]),
        ],
        "suffix",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", "n"])],
        [helper.make_tensor_value_info("joined", TensorProto.STRING, ["batch", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def export_graph(model: onnx.ModelProto, spec: ExportSpec, repository: Path, name: str, version: int = 1) -> Path:
    """Writes a hand-built graph into a repository with a completed config."""
    return write_model(model, build_config(model, name, spec), repository, version, spec.labels)
