"""Export a PyTorch module to `<repo>/<model>/<version>/model.onnx` plus config, checked against PyTorch first.

From Python, `export_torch(module, example_inputs, spec, repository, name)`; from a shell, any
module that a factory (a class or function taking no arguments) builds:

    python -m exporters.export mypackage.models:TinyNet --repository model_repository --name tiny \
        --input x:2x16:float32 --output y [--dynamic x:0=batch,1=sequence --dynamic y:0=batch,1=sequence]

`--input NAME:SHAPE:DTYPE[:HIGH]` gives an example input (integer inputs are drawn below HIGH,
default 2); without `--dynamic`, dimension 0 of every tensor is the batch. The check runs
PyTorch and ONNX Runtime on fresh inputs in which every dynamic dimension has another size.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
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
        check_sizes: The size each named dynamic dimension takes in the check; by default
            check_batch_size for a dimension 0 and the example's size + 2 for others (every
            dynamic dimension is varied, so one frozen by tracing is caught before serving).
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
    check_sizes: dict[str, int] = field(default_factory=dict)

    def axes(self) -> dict[str, dict[int, str]]:
        """The dynamic axes the export declares: the spec's own, or dimension 0 as "batch"."""
        if self.dynamic_axes is not None:
            return self.dynamic_axes
        if self.dynamic_batch:
            return {name: {0: "batch"} for name in [*self.input_names, *self.output_names]}
        return {}


def check_shapes(example_inputs: Sequence, spec: ExportSpec) -> list[list[int]]:  # type: ignore[type-arg]
    """The input shapes of the check: the examples' with every dynamic dimension given another size."""
    axes = spec.axes()
    sizes = dict(spec.check_sizes)
    shapes = []
    for name, example in zip(spec.input_names, example_inputs, strict=True):
        shape = list(example.shape)
        for axis, dim in axes.get(name, {}).items():
            if dim not in sizes:
                other = spec.check_batch_size if axis == 0 else shape[axis] + 2
                sizes[dim] = other if other != shape[axis] else other + 1
            shape[axis] = sizes[dim]
        shapes.append(shape)
    return shapes


def _random_like(example, shape: list[int], generator):  # type: ignore[no-untyped-def]
    import torch

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
    dynamic_axes = spec.axes() or None
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
    _check_names(model, spec)
    return model


def _check_names(model: onnx.ModelProto, spec: ExportSpec) -> None:
    """Refuses a graph whose inputs or outputs the spec does not name one for one.

    The tracer names what the spec leaves out itself (`onnx::Add_12`, `input.3`): a client
    could never ask for such a tensor by a stable name, so the export stops instead.
    """
    for kind, wanted, got in (
        ("input", spec.input_names, [i.name for i in model.graph.input]),
        ("output", spec.output_names, [o.name for o in model.graph.output]),
    ):
        invented = [n for n in got if n not in wanted]
        if invented:
            raise ExportError(
                f"the module has {len(got)} {kind}(s) but the spec names {len(wanted)}: the exporter would have to "
                f"invent the name(s) {invented[:5]}; list every {kind} in the spec's {kind}_names"
            )


def result_tensors(result: object, spec: ExportSpec) -> tuple:  # type: ignore[type-arg]
    """The module's result as a tuple of tensors in output_names order.

    Raises:
        ExportError: a dict or ModelOutput result (its keys have no order the spec can rely
            on), nested results, or a count other than output_names'.
    """
    import torch

    if isinstance(result, torch.Tensor):
        result = (result,)
    if isinstance(result, Mapping):
        raise ExportError(
            f"the module returns a {type(result).__name__} with keys {list(result.keys())[:8]}; the exporter maps "
            "only a tensor or a tuple of tensors to output_names: wrap the module so that forward() returns "
            "a tuple in output_names order (for transformers models, return_dict=False or python -m exporters.hf)"
        )
    if not isinstance(result, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in result):
        kinds = [type(t).__name__ for t in result] if isinstance(result, (tuple, list)) else type(result).__name__
        raise ExportError(f"the module returns {kinds}; the exporter maps only a tensor or a tuple of tensors")
    if len(result) != len(spec.output_names):
        raise ExportError(
            f"the module returns {len(result)} tensors but the spec names {len(spec.output_names)} outputs "
            f"({spec.output_names}); name every output"
        )
    return tuple(result)


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
    if len(example_inputs) != len(spec.input_names):
        raise ExportError(f"{len(example_inputs)} example inputs but {len(spec.input_names)} input_names")
    shapes = check_shapes(example_inputs, spec)
    inputs = [_random_like(x, shape, generator) for x, shape in zip(example_inputs, shapes, strict=True)]
    varied = {n: tuple(s) for n, s in zip(spec.input_names, shapes, strict=True)}
    try:
        with torch.no_grad():
            expected = result_tensors(module(*inputs), spec)
    except ExportError:
        raise
    except Exception as exc:  # the module's own failure, whatever its type
        raise ExportError(
            f"PyTorch cannot run the module at the check's shapes {varied}: {first_line(exc)}; if dynamic "
            "dimensions depend on each other, give their sizes in ExportSpec.check_sizes"
        ) from exc
    session = ort_runtime.OnnxRuntimeSession(model.SerializeToString(), Path("."), ort_runtime.SessionOptions())
    feeds = {n: x.numpy() for n, x in zip(spec.input_names, inputs, strict=True)}
    try:
        actual = session.run(feeds, spec.output_names)
    except Exception as exc:  # ONNX Runtime raises its own types
        raise ExportMismatchError(
            f"ONNX Runtime cannot run the graph at shapes {varied} (PyTorch can): a dimension declared "
            f"dynamic was probably frozen by tracing: {first_line(exc)}"
        ) from exc
    return compare_outputs(spec, expected, actual)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, bounded (ONNX Runtime's messages can be very long)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


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
        ExportError: a module the exporter cannot map (dict results, unnamed outputs, a
            `transformers` model: use `python -m exporters.hf`); nothing was written.
        ExportMismatchError: the check failed; nothing was written.
    """
    if type(module).__module__.startswith("transformers."):
        raise ExportError(
            f"{type(module).__name__} is a transformers model: its forward() takes most arguments by keyword and "
            "returns a ModelOutput; export it with python -m exporters.hf MODEL_DIR --task ..."
        )
    import torch

    module.eval()
    with torch.no_grad():
        result_tensors(module(*example_inputs), spec)  # refuse unmappable results before tracing
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


_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


def _example_input(text: str) -> tuple[str, object]:
    """NAME:SHAPE:DTYPE[:HIGH] -> (name, a random example tensor)."""
    import torch

    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[2] not in _DTYPES:
        raise ExportError(f"--input {text!r}: expected NAME:SHAPE:DTYPE[:HIGH], DTYPE one of {', '.join(_DTYPES)}")
    try:
        shape = [int(d) for d in parts[1].split("x")] if parts[1] else []
        high = int(parts[3]) if len(parts) == 4 else 2
    except ValueError as exc:
        raise ExportError(f"--input {text!r}: SHAPE is sizes joined by x (2x16), HIGH an integer") from exc
    dtype = getattr(torch, parts[2])
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return parts[0], torch.randn(shape, generator=generator).to(dtype)
    return parts[0], torch.randint(0, max(high, 1), shape, generator=generator).to(dtype)


def _dynamic(values: list[str]) -> dict[str, dict[int, str]] | None:
    """--dynamic NAME:AXIS=DIM[,AXIS=DIM] ... -> dynamic_axes."""
    if not values:
        return None
    axes: dict[str, dict[int, str]] = {}
    for text in values:
        name, _, rest = text.partition(":")
        try:
            axes[name] = {int(a): d for a, _, d in (item.partition("=") for item in rest.split(","))}
        except ValueError as exc:
            raise ExportError(f"--dynamic {text!r}: expected NAME:AXIS=DIM[,AXIS=DIM]") from exc
        if not name or any(not d for d in axes[name].values()):
            raise ExportError(f"--dynamic {text!r}: expected NAME:AXIS=DIM[,AXIS=DIM]")
    return axes


def _factory(path: str):  # type: ignore[no-untyped-def]
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ExportError(f"{path!r}: expected MODULE:FACTORY, e.g. mypackage.models:TinyNet")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"cannot import {path}: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    """The command line of export_torch (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("factory", help="MODULE:FACTORY, a class or function that returns the torch module")
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--input", action="append", default=[], help="NAME:SHAPE:DTYPE[:HIGH], in forward() order")
    parser.add_argument("--output", action="append", default=[], help="output name, in forward() return order")
    parser.add_argument("--dynamic", action="append", default=[], help="NAME:AXIS=DIM[,AXIS=DIM]")
    parser.add_argument("--no-batch", action="store_true", help="no batch dimension (max_batch_size 0)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=1e-3)
    args = parser.parse_args(argv)
    try:
        if not args.input or not args.output:
            raise ExportError("give at least one --input and one --output")
        examples = [_example_input(text) for text in args.input]
        spec = ExportSpec(
            [name for name, _ in examples], list(args.output), dynamic_batch=not args.no_batch,
            max_batch_size=args.max_batch_size, opset=args.opset, atol=args.atol, rtol=args.rtol,
            dynamic_axes=_dynamic(args.dynamic),
        )
        path = export_torch(_factory(args.factory)(), [x for _, x in examples], spec, args.repository, args.name,
                            args.version)
    except ExportError as exc:
        sys.exit(f"export failed: {exc}")
    print(f"exported {args.factory} to {path}")


if __name__ == "__main__":
    main()
