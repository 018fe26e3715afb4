"""Export a PyTorch module to `<repo>/<model>/<version>/model.onnx` plus config, checked against PyTorch first."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format

from server.repository import config as model_config
from server.runtime import onnx as ort_runtime
from server.schema import model_config_pb2 as mc


class ExportError(Exception):
    """A model that cannot be exported as asked; the message says what to change."""


class ExportMismatchError(ExportError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the spec's tolerance."""


@dataclass
class ExportSpec:
    """How one model is exported and checked.

    Attributes:
        input_names: ONNX input names, in forward() argument order.
        output_names: ONNX output names, in forward() return order.
        dynamic_batch: Make dimension 0 of every input and output dynamic, and
            write max_batch_size into the config.
        max_batch_size: The config's max_batch_size when dynamic_batch is set.
        opset: ONNX opset version.
        atol: Absolute tolerance of the ORT-vs-PyTorch check.
        rtol: Relative tolerance of the ORT-vs-PyTorch check.
        check_batch_size: Batch size of the fresh random inputs used by the check
            (different from the example's, so a frozen batch dimension is caught).
        labels: Class labels, written to labels.txt and attached to `label_output`.
        label_output: The output that the labels describe.
        dynamic_batching: Write a `dynamic_batching {}` block into the config.
        extra_config: Text-format ModelConfig fields merged into the written config.
        dynamic_axes: Dynamic axes per tensor name; replaces the batch-only default
            (for models such as decoders whose sequence lengths vary too).
    """

    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool = True
    max_batch_size: int = 64
    opset: int = 17
    atol: float = 1e-4
    rtol: float = 1e-3
    check_batch_size: int = 3
    labels: list[str] = field(default_factory=list)
    label_output: str = ""
    dynamic_batching: bool = False
    extra_config: str = ""
    dynamic_axes: dict[str, dict[int, str]] | None = None


def _random_like(example, batch_size: int | None, generator):  # type: ignore[no-untyped-def]
    import torch

    shape = list(example.shape)
    if batch_size is not None and shape:
        shape[0] = batch_size
    if example.dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(example.dtype)
    if example.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    high = int(example.max().item()) + 1 if example.numel() else 2
    return torch.randint(0, max(high, 2), shape, generator=generator).to(example.dtype)


def to_onnx(module, example_inputs: Sequence, spec: ExportSpec) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    """Traces the module into an ONNX model with the spec's names and dynamic axes.

    Uses torch's TorchScript-based exporter: it is about 30x faster than the
    torch.export-based one for these models and its output is stable across torch
    releases; its deprecation warning is silenced here on purpose.
    """
    import torch

    module.eval()
    dynamic_axes = spec.dynamic_axes
    if dynamic_axes is None and spec.dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in [*spec.input_names, *spec.output_names]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example_inputs),
            buffer,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=dynamic_axes,
            opset_version=spec.opset,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    return model


def check_against_torch(  # type: ignore[no-untyped-def]
    module, model: onnx.ModelProto, example_inputs: Sequence, spec: ExportSpec, seed: int = 0
) -> float:
    """Runs ORT and PyTorch on fresh random inputs and compares every output.

    Returns:
        The largest absolute difference seen.

    Raises:
        ExportMismatchError: a shape differs, or values differ beyond atol + rtol * |torch|.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    batch = spec.check_batch_size if spec.dynamic_batch else None
    inputs = [_random_like(x, batch, generator) for x in example_inputs]
    with torch.no_grad():
        expected = module(*inputs)
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    session = ort_runtime.OnnxRuntimeSession(model.SerializeToString(), Path("."), ort_runtime.SessionOptions())
    # input_names follow forward()'s arguments one for one: a length mismatch is a bad spec.
    feeds = {n: x.numpy() for n, x in zip(spec.input_names, inputs, strict=True)}
    actual = session.run(feeds, spec.output_names)
    return compare_outputs(spec, expected, actual)


def compare_outputs(spec: ExportSpec, expected: Sequence, actual: Sequence[np.ndarray]) -> float:
    """Compares PyTorch's outputs (tensors) with ONNX Runtime's, output by output.

    Returns:
        The largest absolute difference seen.

    Raises:
        ExportMismatchError: a shape differs (reported apart), or values differ beyond
            atol + rtol * |torch|.
    """
    worst = 0.0
    for name, want, got in zip(spec.output_names, expected, actual, strict=True):
        want_np = want.detach().numpy()
        if want_np.shape != got.shape:
            raise ExportMismatchError(f"output '{name}': ONNX Runtime shape {got.shape}, PyTorch shape {want_np.shape}")
        diff = np.abs(got.astype(np.float64) - want_np.astype(np.float64))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        if not np.all(diff <= spec.atol + spec.rtol * np.abs(want_np.astype(np.float64))):
            raise ExportMismatchError(
                f"output '{name}': ONNX Runtime differs from PyTorch by up to {float(diff.max()):.3g} "
                f"(atol {spec.atol}, rtol {spec.rtol})"
            )
    return worst


def build_config(model: onnx.ModelProto, name: str, spec: ExportSpec) -> mc.ModelConfig:
    """The model's config: the graph's signature completed the same way the server does it."""
    config = mc.ModelConfig(name=name, max_batch_size=spec.max_batch_size if spec.dynamic_batch else 0)
    if spec.extra_config:
        text_format.Merge(spec.extra_config, config)
    if spec.dynamic_batching and not config.HasField("dynamic_batching"):
        config.dynamic_batching.SetInParent()
    session = ort_runtime.OnnxRuntimeSession(model.SerializeToString(), Path("."), ort_runtime.SessionOptions())
    for tensor in session.inputs:
        config.input.add(name=tensor.name)
    for tensor in session.outputs:
        output = config.output.add(name=tensor.name)
        if spec.labels and tensor.name == spec.label_output:
            output.label_filename = "labels.txt"
    model_config.complete_config(config, session.inputs, session.outputs, spec.max_batch_size)
    return config


def write_model(
    model: onnx.ModelProto, config: mc.ModelConfig, repository: Path, version: int, labels: Sequence[str] = ()
) -> Path:
    """Writes config.pbtxt, labels.txt and <version>/model.onnx; each file appears whole or not at all.

    Returns:
        The model directory.
    """
    model_dir = repository / config.name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    files = {
        version_dir / "model.onnx": model.SerializeToString(),
        model_dir / "config.pbtxt": text_format.MessageToString(config).encode(),
    }
    if labels:
        files[model_dir / "labels.txt"] = ("\n".join(labels) + "\n").encode()
    for path, data in files.items():
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600 files
        os.replace(tmp.name, path)
    return model_dir


def export_torch(  # type: ignore[no-untyped-def]
    module,
    example_inputs: Sequence,
    spec: ExportSpec,
    repository: Path,
    name: str,
    version: int = 1,
    seed: int = 0,
) -> Path:
    """Exports, checks against PyTorch, and only then writes the model into the repository.

    Returns:
        The model directory.

    Raises:
        ExportMismatchError: the check failed; nothing was written.
    """
    model = to_onnx(module, example_inputs, spec)
    check_against_torch(module, model, example_inputs, spec, seed)
    return write_model(model, build_config(model, name, spec), repository, version, spec.labels)


def write_ensemble(repository: Path, name: str, config_text: str, labels: Sequence[str] = ()) -> Path:
    """Writes an ensemble: its config (checked to parse), labels, and the empty version folder 1/."""
    config = mc.ModelConfig()
    text_format.Parse(config_text, config)
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    if labels:
        (model_dir / "labels.txt").write_text("\n".join(labels) + "\n")
    return model_dir


def remove_model(repository: Path, name: str) -> None:
    """Deletes a model directory (used before a rebuild)."""
    shutil.rmtree(repository / name, ignore_errors=True)
