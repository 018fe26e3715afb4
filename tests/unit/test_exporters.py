"""The exporter checks ONNX Runtime against PyTorch before writing anything."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from exporters.export import ExportMismatchError, ExportSpec, export_torch, to_onnx


class BatchDependent(torch.nn.Module):
    """Traces as `x` at batch 2, but doubles at any other batch: a frozen-branch export bug."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 2:
            return x
        return x * 2


class TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_mismatch_is_an_error_and_nothing_is_written(tmp_path: Path) -> None:
    spec = ExportSpec(["x"], ["y"])
    with pytest.raises(ExportMismatchError, match="output 'y'"):
        export_torch(BatchDependent(), (torch.zeros(2, 4),), spec, tmp_path, "bad")
    assert not (tmp_path / "bad").exists()


def test_shape_mismatch_is_reported_apart(tmp_path: Path) -> None:
    class Frozen(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = int(x.shape[0])  # a Python int: the trace freezes it at 2
            return torch.ones(rows, 1) * x.sum()

    with pytest.raises(ExportMismatchError, match="shape"):
        export_torch(Frozen(), (torch.zeros(2, 4),), ExportSpec(["x"], ["y"]), tmp_path, "frozen")


def test_export_writes_model_and_config_with_dynamic_batch(tmp_path: Path) -> None:
    spec = ExportSpec(["x"], ["y"], max_batch_size=16)
    model_dir = export_torch(TwoLayer(), (torch.zeros(2, 5),), spec, tmp_path, "mlp")
    graph = onnx.load(model_dir / "1" / "model.onnx").graph
    for value in [*graph.input, *graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.dim_value
    config = (model_dir / "config.pbtxt").read_text()
    assert "max_batch_size: 16" in config and 'name: "x"' in config and "dims: 5" in config


def test_tolerance_is_applied() -> None:
    model = to_onnx(TwoLayer(), (torch.zeros(2, 5),), ExportSpec(["x"], ["y"]))
    assert len(model.graph.node) >= 3
