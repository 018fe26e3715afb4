"""int8 and FP16 variants of an exported model, written only if they match the FP32 model on held-out data.

    python -m exporters.quantize MODEL_DIR --mode int8-dynamic --data held_out.npz [--rtol 0.05]
    python -m exporters.quantize MODEL_DIR --mode int8-static --calibration calib.npz \\
        --data held_out.npz --labels-key labels [--max-accuracy-drop 0.5]
    python -m exporters.quantize MODEL_DIR --mode fp16 --data held_out.npz

MODEL_DIR is a model of a repository (its config.pbtxt and numbered versions; the newest
is read). The variant is written beside it as `<name>_<suffix>` (or --name), version 1, with
the same config (batching, labels) and the same FP32 inputs and outputs, so clients do not
change. The .npz files hold one array per model input, keyed by input name, batch first;
--labels-key names an extra array of class indices in the held-out file.

Modes, all from ONNX Runtime's own tools:
- int8-dynamic: `onnxruntime.quantization.quantize_dynamic`, int8 weights, activations
  quantised per run from their observed range. No calibration; suits MatMul-heavy models.
- int8-static: `quantize_static` in QDQ format, int8 weights (per channel) and int8
  activations with fixed scales measured on the calibration set (MinMax). Suits CNNs.
- fp16: `onnxruntime.transformers.float16.convert_float_to_float16` with the inputs and
  outputs kept FP32 (casts at the edges). For GPUs: ONNX Runtime's CPU provider loads and
  runs it, casting around the nodes it has no FP16 kernel for, at no gain (0.8-1.3x FP32's
  speed on the benchmark's models, bench/run_quantized.py --fp16).

The gate, on the held-out set: with labels, the variant's top-1 accuracy may be at most
--max-accuracy-drop points (default 0.5) under the FP32 model's; without labels, every
sample's relative L2 error ||variant - fp32|| / ||fp32|| (per output) is computed and its 99th
percentile over the samples must be within --rtol (default 0.05): a percentile rather than
the maximum because a sample whose FP32 output is near zero has a huge relative error from
any rounding at all (the worst is reported too). A variant that misses is refused
(AccuracyGateError, an ExportError, with the measured figure) and nothing is written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format

from exporters.export import ExportError, write_model
from server.schema import model_config_pb2 as mc

MODES = {"int8-dynamic": "int8", "int8-static": "int8", "fp16": "fp16"}
MAX_ACCURACY_DROP_POINTS = 0.5
RTOL = 0.05
RUN_BATCH = 256  # held-out samples per session run: bounded memory whatever the set's size


class AccuracyGateError(ExportError):
    """A variant that misses its accuracy bound against the FP32 model; the message holds the measured figure."""


@dataclass
class HeldOut:
    """Held-out data for the gate.

    Attributes:
        inputs: One array per model input, keyed by input name, samples on axis 0.
        labels: Class index per sample; when given, the gate compares top-1 accuracy.
        class_output: The output whose argmax is the class (default: the model's first output).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    class_output: str = ""


@dataclass
class GateResult:
    """What the gate measured: the variant against the FP32 model on the same held-out samples."""

    mode: str
    samples: int
    p99_relative_error: float
    worst_relative_error: float
    top1_agreement: float
    reference_accuracy: float | None = None
    variant_accuracy: float | None = None

    def summary(self) -> str:
        """One line for logs and the command line."""
        text = (f"{self.mode}: {self.samples} held-out samples, relative error p99 {self.p99_relative_error:.4f} "
                f"(worst {self.worst_relative_error:.4f}), top-1 agreement with FP32 {self.top1_agreement:.4f}")
        if self.reference_accuracy is not None and self.variant_accuracy is not None:
            text += f", accuracy {self.variant_accuracy:.4f} (FP32 {self.reference_accuracy:.4f})"
        return text


class _ArrayReader:
    """`onnxruntime.quantization.CalibrationDataReader` over in-memory arrays, in fixed batches."""

    def __init__(self, inputs: dict[str, np.ndarray], batch_size: int) -> None:
        count = len(next(iter(inputs.values())))
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{k: v[start : start + batch_size] for k, v in inputs.items()} for start in range(0, count, batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _through_files(model: onnx.ModelProto, work: Path) -> Path:
    """ORT's quantisers take paths; the model goes through a scratch file."""
    path = work / "fp32.onnx"
    onnx.save(model, str(path))
    return path


def quantize_dynamic_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """int8 weights; activations quantised per run from their range (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        quant_pre_process(_through_files(model, work), work / "prepared.onnx", skip_symbolic_shape=True)
        quantize_dynamic(work / "prepared.onnx", work / "int8.onnx", weight_type=QuantType.QInt8)
        return onnx.load(str(work / "int8.onnx"))


def quantize_static_int8(
    model: onnx.ModelProto, calibration: dict[str, np.ndarray], batch_size: int = 64
) -> onnx.ModelProto:
    """QDQ int8 (signed activations and weights, ORT's recommended first choice), weights per channel, activation
    scales from the calibration set's min/max (deterministic for a given set)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        # Shape inference and graph fusion first, as ORT's guide asks: scales are then placed on fused nodes.
        quant_pre_process(_through_files(model, work), work / "prepared.onnx", skip_symbolic_shape=True)
        quantize_static(
            work / "prepared.onnx", work / "int8.onnx", _ArrayReader(calibration, batch_size),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
        return onnx.load(str(work / "int8.onnx"))


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and arithmetic, FP32 inputs and outputs (the served signature does not change)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted: onnx.ModelProto = convert_float_to_float16(model, keep_io_types=True)
    return converted


def make_variant(
    model: onnx.ModelProto, mode: str, calibration: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """The variant of an FP32 model for `mode` (one of MODES).

    Raises:
        ExportError: unknown mode, or int8-static without a calibration set.
    """
    if mode == "int8-dynamic":
        return quantize_dynamic_int8(model)
    if mode == "int8-static":
        if not calibration:
            raise ExportError("int8-static needs a calibration set (--calibration): its activation scales come from it")
        return quantize_static_int8(model, calibration)
    if mode == "fp16":
        return convert_fp16(model)
    raise ExportError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")


def run_model(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the model on every sample (CPU provider), run RUN_BATCH samples at a time."""
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types: a graph it cannot run here
        raise ExportError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from exc
    expected = {i.name for i in session.get_inputs()}
    if set(inputs) != expected:
        raise ExportError(f"the data holds arrays {sorted(inputs)}; the model's inputs are {sorted(expected)}")
    names = [o.name for o in session.get_outputs()]
    count = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, count, RUN_BATCH):
        results = session.run(names, {k: v[start : start + RUN_BATCH] for k, v in inputs.items()})
        for name, value in zip(names, results, strict=True):
            parts[name].append(np.asarray(value))
    return {n: np.concatenate(p) for n, p in parts.items()}


def measure(reference: onnx.ModelProto, variant: onnx.ModelProto, held_out: HeldOut, mode: str) -> GateResult:
    """Runs both models on the held-out set and compares them (nothing is refused here: see `check`).

    Raises:
        ExportError: the data does not fit the model, or a model cannot run on the CPU provider.
    """
    want, got = run_model(reference, held_out.inputs), run_model(variant, held_out.inputs)
    errors = []
    for name, expected in want.items():
        flat_want = expected.reshape(len(expected), -1).astype(np.float64)
        flat_got = got[name].reshape(len(expected), -1).astype(np.float64)
        norms = np.maximum(np.linalg.norm(flat_want, axis=1), np.finfo(np.float32).tiny)
        errors.append(np.linalg.norm(flat_got - flat_want, axis=1) / norms)
    # Per sample: the output that differs most.
    per_sample = np.max(np.stack(errors), axis=0)
    class_output = held_out.class_output or next(iter(want))
    if class_output not in want:
        raise ExportError(f"no output {class_output!r}; the model's outputs are {', '.join(want)}")
    want_top1, got_top1 = want[class_output].argmax(-1), got[class_output].argmax(-1)
    result = GateResult(
        mode, len(want_top1), float(np.percentile(per_sample, 99)), float(per_sample.max()),
        float((want_top1 == got_top1).mean()),
    )
    if held_out.labels is not None:
        result.reference_accuracy = float((want_top1 == held_out.labels).mean())
        result.variant_accuracy = float((got_top1 == held_out.labels).mean())
    return result


def check(result: GateResult, max_accuracy_drop_points: float = MAX_ACCURACY_DROP_POINTS, rtol: float = RTOL) -> None:
    """Refuses a variant that misses its bound: accuracy when labels were given, else the relative error.

    Raises:
        AccuracyGateError: with the measured figure and the bound.
    """
    if result.reference_accuracy is not None and result.variant_accuracy is not None:
        drop = (result.reference_accuracy - result.variant_accuracy) * 100
        if drop > max_accuracy_drop_points:
            raise AccuracyGateError(
                f"{result.mode} variant refused: held-out accuracy {result.variant_accuracy:.4f} vs FP32 "
                f"{result.reference_accuracy:.4f}, {drop:.2f} points lower (bound {max_accuracy_drop_points} points)"
            )
    elif result.p99_relative_error > rtol:
        raise AccuracyGateError(
            f"{result.mode} variant refused: outputs differ from FP32 by {result.p99_relative_error:.4g} "
            f"(99th percentile of the relative L2 error per sample; bound {rtol})"
        )


def newest_model(model_dir: Path) -> Path:
    """The model.onnx of the highest numbered version of a repository model."""
    versions = sorted(
        (int(p.name), p) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()
    )
    if not versions:
        raise ExportError(f"{model_dir} has no numbered version directory holding model.onnx")
    return versions[-1][1] / "model.onnx"


def quantize_model_dir(
    model_dir: Path,
    mode: str,
    held_out: HeldOut,
    repository: Path | None = None,
    name: str | None = None,
    calibration: dict[str, np.ndarray] | None = None,
    max_accuracy_drop_points: float = MAX_ACCURACY_DROP_POINTS,
    rtol: float = RTOL,
) -> tuple[Path, GateResult]:
    """Makes the variant of a repository model, gates it, and only then writes it as version 1 of `name`.

    Returns:
        The new model's directory and what the gate measured.

    Raises:
        AccuracyGateError: the variant missed its bound; nothing was written.
        ExportError: the source cannot be read or the variant cannot be made.
    """
    if mode not in MODES:
        raise ExportError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise ExportError(f"{model_dir} has no config.pbtxt")
    config = mc.ModelConfig()
    text_format.Parse(config_path.read_text(), config)
    reference = onnx.load(str(newest_model(model_dir)))
    variant = make_variant(reference, mode, calibration)
    result = measure(reference, variant, held_out, mode)
    check(result, max_accuracy_drop_points, rtol)
    config.name = name or f"{config.name or model_dir.name}_{MODES[mode]}"
    target = write_model(variant, config, repository or model_dir.parent, 1)
    for output in config.output:  # label files, under the names the config gives them
        if output.label_filename and (model_dir / output.label_filename).is_file():
            shutil.copyfile(model_dir / output.label_filename, target / output.label_filename)
    return target, result


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a model of a repository (config.pbtxt, numbered versions)")
    parser.add_argument("--mode", required=True, choices=list(MODES))
    parser.add_argument("--data", type=Path, required=True, help="held-out .npz: one array per input, by name")
    parser.add_argument("--labels-key", help="the array of class indices in --data (gate on accuracy)")
    parser.add_argument("--class-output", default="", help="the output whose argmax is the class (default: first)")
    parser.add_argument("--calibration", type=Path, help="calibration .npz for int8-static (not the held-out set)")
    parser.add_argument("--repository", type=Path, help="where to write (default: MODEL_DIR's repository)")
    parser.add_argument("--name", help="the variant's model name (default: <name>_int8 or <name>_fp16)")
    parser.add_argument("--max-accuracy-drop", type=float, default=MAX_ACCURACY_DROP_POINTS, help="points")
    parser.add_argument("--rtol", type=float, default=RTOL, help="relative L2 error per sample, without labels")
    args = parser.parse_args(argv)
    try:
        inputs = _load_npz(args.data)
        labels = None
        if args.labels_key:
            if args.labels_key not in inputs:
                raise ExportError(f"{args.data} has no array {args.labels_key!r} (it has {', '.join(inputs)})")
            labels = inputs.pop(args.labels_key)
        calibration = _load_npz(args.calibration) if args.calibration else None
        path, result = quantize_model_dir(
            args.model_dir, args.mode, HeldOut(inputs, labels, args.class_output), args.repository, args.name,
            calibration, args.max_accuracy_drop, args.rtol,
        )
    except (ExportError, OSError, ValueError) as exc:
        sys.exit(f"quantize failed: {exc}")
    print(result.summary())
    print(f"written to {path}")


if __name__ == "__main__":
    main()
