"""int8 and FP16 variants: the accuracy gate lets good ones through and refuses bad ones; digits_int8 is served."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as grpcclient

from exporters import quantize
from exporters.export import ExportError, ExportSpec, export_torch
from exporters.models import digits
from tests.conftest import ROOT, ServerProcess


class TinyMLP(torch.nn.Module):
    """MatMul-heavy like the benchmark's MLP, smaller: [B, 64] -> 256 -> 256 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Models:
    repository: Path
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mlp_data: np.ndarray


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """A briefly trained digits CNN (about 95% held out) and a random MLP, exported once for the module."""
    repository = tmp_path_factory.mktemp("quantize")
    config = digits.DigitsConfig(epochs=6)
    model, _ = digits.train(config, progress=False)
    digits.export(model, repository)
    export_torch(TinyMLP(), (torch.zeros(2, 64),), ExportSpec(["x"], ["y"]), repository, "mlp")
    x_train, x_test, _, y_test = digits.load_split(config)
    mlp_data = np.random.default_rng(0).standard_normal((512, 64), dtype=np.float32)
    return Models(repository, x_train, x_test, y_test, mlp_data)


def digits_held_out(models: Models) -> quantize.HeldOut:
    return quantize.HeldOut({"image": models.x_test}, models.y_test)


def test_static_int8_digits_is_within_half_a_point_and_written(models: Models) -> None:
    path, result = quantize.quantize_model_dir(
        models.repository / "digits", "int8-static", digits_held_out(models), calibration={"image": models.x_train}
    )
    assert path == models.repository / "digits_int8"
    assert result.reference_accuracy is not None and result.variant_accuracy is not None
    assert result.variant_accuracy >= result.reference_accuracy - 0.005, result.summary()
    # Really int8: the graph quantises, and the same config and labels came along under the new name.
    graph = onnx.load(str(path / "1" / "model.onnx")).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    assert 'name: "digits_int8"' in (path / "config.pbtxt").read_text()
    assert "dynamic_batching" in (path / "config.pbtxt").read_text()
    assert (path / "labels.txt").read_text() == (models.repository / "digits" / "labels.txt").read_text()


def test_calibration_that_wrecks_the_scales_is_refused_and_nothing_written(models: Models) -> None:
    """Scales fitted to pixels 1000x brighter than real ones round every real activation to a few levels."""
    with pytest.raises(ExportError, match=r"accuracy 0\.\d+ vs FP32 0\.\d+, \d+\.\d\d points lower \(bound 0\.5"):
        quantize.quantize_model_dir(
            models.repository / "digits", "int8-static", digits_held_out(models), name="digits_wrecked",
            calibration={"image": models.x_train * 1000},
        )
    assert not (models.repository / "digits_wrecked").exists()


def test_dynamic_int8_mlp_is_within_the_relative_tolerance(models: Models) -> None:
    path, result = quantize.quantize_model_dir(
        models.repository / "mlp", "int8-dynamic", quantize.HeldOut({"x": models.mlp_data})
    )
    assert result.p99_relative_error <= quantize.RTOL and result.reference_accuracy is None
    assert any(node.op_type == "DynamicQuantizeLinear" for node in onnx.load(str(path / "1" / "model.onnx")).graph.node)


def test_a_bound_the_int8_mlp_cannot_meet_is_refused_with_the_measured_figure(models: Models) -> None:
    with pytest.raises(quantize.AccuracyGateError, match=r"differ from FP32 by 0\.0\d+ .*bound 1e-06"):
        quantize.quantize_model_dir(
            models.repository / "mlp", "int8-dynamic", quantize.HeldOut({"x": models.mlp_data}), name="mlp_tight",
            rtol=1e-6,
        )
    assert not (models.repository / "mlp_tight").exists()


def test_fp16_loads_on_the_cpu_provider_and_keeps_fp32_inputs_and_outputs(models: Models) -> None:
    """ORT's CPU provider runs the graph (it casts around the nodes it has no FP16 kernel for)."""
    path, result = quantize.quantize_model_dir(models.repository / "digits", "fp16", digits_held_out(models))
    assert path.name == "digits_fp16" and result.p99_relative_error < 0.01 and result.top1_agreement == 1.0
    graph = onnx.load(str(path / "1" / "model.onnx")).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert {i.type.tensor_type.elem_type for i in [*graph.input, *graph.output]} == {onnx.TensorProto.FLOAT}


def test_the_command_line(models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "held_out.npz", image=models.x_test, labels=models.y_test)
    np.savez(tmp_path / "calibration.npz", image=models.x_train[:256])
    quantize.main([
        str(models.repository / "digits"), "--mode", "int8-static", "--data", str(tmp_path / "held_out.npz"),
        "--labels-key", "labels", "--calibration", str(tmp_path / "calibration.npz"),
        "--repository", str(tmp_path / "out"), "--name", "d8",
    ])
    assert "int8-static: 450 held-out samples" in capsys.readouterr().out
    assert (tmp_path / "out" / "d8" / "1" / "model.onnx").is_file()
    refusals = [
        ["--mode", "int8-static", "--data", str(tmp_path / "held_out.npz")],  # no calibration set
        ["--mode", "int8-dynamic", "--data", str(tmp_path / "calibration.npz"), "--labels-key", "nope"],
        ["--mode", "int8-dynamic", "--data", str(tmp_path / "held_out.npz")],  # "labels" is not an input
    ]
    for argv in refusals:
        with pytest.raises(SystemExit, match="quantize failed: "):
            quantize.main([str(models.repository / "digits"), *argv, "--repository", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


def test_the_committed_digits_int8_is_served_and_as_accurate_as_fp32(tmp_path: Path) -> None:
    """The example repository's int8 model through tritonclient, against the FP32 digits in the same server."""
    server = ServerProcess(
        ROOT / "model_repository", tmp_path, "--model-control-mode", "explicit",
        "--load-model", "digits", "--load-model", "digits_int8",
    )
    try:
        _, x_test, _, y_test = digits.load_split(digits.DigitsConfig())
        client = grpcclient.InferenceServerClient(server.address)
        accuracy = {}
        for name in ("digits", "digits_int8"):
            predictions = []
            for start in range(0, len(x_test), 64):
                batch = x_test[start : start + 64]
                tensor = grpcclient.InferInput("image", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                result = client.infer(name, [tensor], outputs=[grpcclient.InferRequestedOutput("logits")])
                predictions.append(result.as_numpy("logits").argmax(1))
            accuracy[name] = float((np.concatenate(predictions) == y_test).mean())
        client.close()
        # The bound build_examples gated it on, and the example repository's floor.
        assert accuracy["digits_int8"] >= accuracy["digits"] - 0.005 and accuracy["digits_int8"] >= 0.97, accuracy
    finally:
        assert server.stop() == 0, server.log()
