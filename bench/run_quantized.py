"""FP32 vs int8 (and FP16), side by side: throughput and accuracy. `python bench/run_quantized.py [--fp16]`

For the benchmark's MLP (int8: dynamic quantisation) and CNN (int8: static QDQ, calibrated on
256 random inputs, gated on 1,024 others), both from bench/models.py, and for the example
repository's digits CNN (FP32 `digits` vs the committed `digits_int8`, with real labels):
1. accuracy: the exporters' gate figures (exporters/quantize.py): for MLP and CNN, whose weights are
   random and have no labels, the 99th-percentile relative L2 error against FP32 and top-1 agreement
   with FP32 on held-out random inputs; for digits, held-out accuracy on its 450 test images;
2. ONNX Runtime alone (bench/inprocess.py's loop) at batch 1 and 64: the compute ratio;
3. ortserve (2 workers, dynamic batching) under perf_analyzer over gRPC, batch 1 per request, concurrency 64.
Writes the variants to bench/out/quant_repo, prints markdown and writes bench/out/quantized.md.
Needs bench/setup_perf_analyzer.sh to have run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from inprocess import measure  # noqa: E402
from run_batching import OUT, PYTHON, ROOT, perf_analyzer, start_ortserve, stop  # noqa: E402

from exporters import quantize  # noqa: E402
from exporters.models import digits  # noqa: E402

SHAPES = {"mlp": (256,), "cnn": (3, 32, 32)}
INT8_MODE = {"mlp": "int8-dynamic", "cnn": "int8-static"}


def build(repo: Path, fp16: bool) -> dict[str, quantize.GateResult]:
    """FP32 models copied from bench/out/repo and the example repository, their variants made and gated here."""
    source = OUT / "repo"
    if not all((source / name).exists() for name in SHAPES):
        subprocess.run([PYTHON, str(BENCH / "models.py"), "--out", str(source)], cwd=ROOT, check=True)
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for name in SHAPES:
        shutil.copytree(source / name, repo / name)
    for name in ("digits", "digits_int8"):
        shutil.copytree(ROOT / "model_repository" / name, repo / name)
    results: dict[str, quantize.GateResult] = {}
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        held_out = quantize.HeldOut({"INPUT": rng.standard_normal((1024, *shape), dtype=np.float32)})
        calibration = {"INPUT": rng.standard_normal((256, *shape), dtype=np.float32)}
        modes = [INT8_MODE[name]] + (["fp16"] if fp16 else [])
        for mode in modes:
            _, result = quantize.quantize_model_dir(repo / name, mode, held_out, calibration=calibration)
            results[f"{name}_{quantize.MODES[mode]}"] = result
    # digits_int8 is the committed model: measure it the way build_examples gated it, without rebuilding it.
    import onnx

    _, x_test, _, y_test = digits.load_split(digits.DigitsConfig())
    reference = onnx.load(str(quantize.newest_model(repo / "digits")))
    variant = onnx.load(str(quantize.newest_model(repo / "digits_int8")))
    results["digits_int8"] = quantize.measure(reference, variant, quantize.HeldOut({"image": x_test}, y_test), "int8")
    if fp16:
        _, results["digits_fp16"] = quantize.quantize_model_dir(
            repo / "digits", "fp16", quantize.HeldOut({"image": x_test}, y_test)
        )
    return results


def accuracy_cell(result: quantize.GateResult | None) -> str:
    if result is None:
        return "reference"
    if result.variant_accuracy is not None:
        return f"accuracy {result.variant_accuracy:.4f} (FP32 {result.reference_accuracy:.4f})"
    return f"rel. error p99 {result.p99_relative_error:.4f}, top-1 agreement {result.top1_agreement:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp16", action="store_true", help="FP16 variants too (on the CPU provider: for reference)")
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer's measurement window")
    parser.add_argument("--seconds", type=float, default=2.0, help="ONNX Runtime alone: seconds per measurement")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    repo = OUT / "quant_repo"
    results = build(repo, args.fp16)
    suffixes = ["", "_int8"] + (["_fp16"] if args.fp16 else [])
    names = [f"{base}{suffix}" for base in ("mlp", "cnn", "digits") for suffix in suffixes]
    inprocess = {(n, b): measure(repo, n, b, args.seconds)[0] for n in names for b in (1, 64)}
    process, port = start_ortserve(repo, 2)
    try:
        served = {n: perf_analyzer(n, port, 64, args.interval_ms, "quantized_pa.csv") for n in names}
    finally:
        stop(process)

    lines = [
        "| model | variant | accuracy vs FP32 (held out) | ORT alone b=1 infer/s | ORT alone b=64 infer/s "
        "| ortserve c=64 infer/s | c=64 p50 ms | c=64 vs FP32 |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        base, _, variant = name.partition("_")
        fp32 = served[base]["rate"]
        lines.append(
            f"| {base} | {variant or 'fp32'} | {accuracy_cell(results.get(name))} "
            f"| {inprocess[(name, 1)]:,.0f} | {inprocess[(name, 64)]:,.0f} | {served[name]['rate']:,.0f} "
            f"| {served[name]['p50_ms']:.2f} | {served[name]['rate'] / fp32:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    (OUT / "quantized.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
