"""The in-process limit: ONNX Runtime alone on the benchmark models at several batch sizes.

`python bench/inprocess.py [--repo bench/out/repo] [--seconds 3]` prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from server.repository.loader import load_model
from server.repository.repository import ModelRepository


def measure(repo: Path, name: str, batch: int, seconds: float) -> tuple[float, float]:
    [model] = load_model(ModelRepository(repo), name, "cpu", 64)
    instance = model._instances[0]
    spec = model.signature.inputs[0]
    x = np.random.default_rng(0).standard_normal((batch, *spec.dims)).astype(np.float32)
    outputs = [o.name for o in model.signature.outputs]
    for _ in range(20):
        instance.run({spec.name: x}, outputs)
    runs, start = 0, time.perf_counter()
    latencies = []
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        instance.run({spec.name: x}, outputs)
        latencies.append(time.perf_counter() - t0)
        runs += 1
    elapsed = time.perf_counter() - start
    model.close()
    return runs * batch / elapsed, float(np.median(latencies) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path(__file__).parent / "out" / "repo")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print("| model | batch | inferences/s | p50 run (ms) |")
    print("|---|---:|---:|---:|")
    for name in ("mlp", "cnn"):
        for batch in (1, 4, 16, 64):
            rate, p50 = measure(args.repo, name, batch, args.seconds)
            print(f"| {name} | {batch} | {rate:,.0f} | {p50:.3f} |", flush=True)


if __name__ == "__main__":
    main()
