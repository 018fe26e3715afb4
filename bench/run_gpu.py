"""The MLP and CNN on a GPU, CUDA against the CPU provider, in under 5 minutes: `python bench/run_gpu.py
[--interval-ms 2000] [--workers 1]` (issue 15, part 5).

For a machine with an NVIDIA GPU where `bash scripts/setup.sh` and `bash bench/setup_perf_analyzer.sh` have run
(onnxruntime-gpu is the project's ONNX Runtime on Linux x86_64). Builds bench/models.py's repository if it is
missing (that needs torch; build it elsewhere and copy bench/out/repo over otherwise), prints `nvidia-smi`'s GPU
line, then serves the repository twice, `--device cuda` and `--device cpu`, and measures with perf_analyzer over
gRPC, batch 1 per request: `mlp` and `cnn` (no queue delay) and `mlp_delay1ms`/`cnn_delay1ms` (1 ms, adaptive)
at concurrency 1 and 64, and on CUDA also `*_delay1ms_graphs` (the same with one CUDA graph per batch-size bucket,
server/runtime/device_io.py; every CUDA run uses I/O binding with pinned staging). It refuses to report CUDA
figures unless the server's ModelConfig says the model runs on CUDAExecutionProvider (a silent CPU fallback
would otherwise pass for GPU numbers). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import ROOT, bench_repository, perf_analyzer  # noqa: E402
from run_metrics_overhead import start_server, stop_server  # noqa: E402

MODELS = ("mlp", "mlp_delay1ms", "cnn", "cnn_delay1ms")
GRAPH_MODELS = ("mlp_delay1ms_graphs", "cnn_delay1ms_graphs")  # CUDA graphs: measured on the GPU only


def provider(http_port: int, model: str) -> str:
    """The execution provider the server reports in the model's config."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/config", timeout=30) as answer:
        config = json.loads(answer.read())
    return str(config.get("parameters", {}).get("execution_provider", {}).get("string_value", "?"))


SHAPES = {"mlp": (256,), "cnn": (3, 32, 32)}
CHECK_BATCHES = (1, 3, 8, 64)  # buckets 1, 4 (padded), 8 and the largest


def answers(http_port: int, models: tuple[str, ...]) -> dict[tuple[str, int, str], np.ndarray]:
    """Each model's OUTPUT for seeded inputs of several batch sizes (tritonclient over HTTP)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    found = {}
    for model in models:
        shape = SHAPES[model.split("_")[0]]
        for rows in CHECK_BATCHES:
            data = np.random.default_rng(rows).standard_normal((rows, *shape)).astype(np.float32)
            tensor = httpclient.InferInput("INPUT", list(data.shape), "FP32")
            tensor.set_data_from_numpy(data)
            found[(model.split("_")[0], rows, model)] = client.infer(model, [tensor]).as_numpy("OUTPUT")
    client.close()
    return found


def check_answers(found: dict[tuple[str, int, str], np.ndarray]) -> str:
    """Every variant on every device must answer what the CPU's plain `mlp`/`cnn` answers (TF32 on the GPU:
    1e-2 relative). Stops the script on a wrong answer: GPU speed with wrong results is not a result."""
    worst = 0.0
    for (base, rows, model), value in found.items():
        reference = found[(base, rows, f"{base}@cpu")]
        if value.shape != reference.shape or not np.allclose(value, reference, rtol=1e-2, atol=1e-3):
            raise SystemExit(f"{model} answers batch {rows} differently from the CPU")
        worst = max(worst, float(np.max(np.abs(value - reference))))
    return f"answers: every CUDA variant within 1e-2 of the CPU for batches {CHECK_BATCHES} (max |diff| {worst:.2e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval-ms", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    repo = bench_repository(*MODELS, *GRAPH_MODELS)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = ""
    print(f"GPU: {smi or 'none found (no nvidia-smi)'}", flush=True)
    rows: list[str] = []
    found: dict[tuple[str, int, str], np.ndarray] = {}
    for device in ("cuda", "cpu"):
        server = start_server(f"gpu_{device}", ROOT, repo, args.workers, ["--device", device])
        try:
            models = MODELS + GRAPH_MODELS if device == "cuda" else MODELS
            used = {m: provider(server.http_port, m) for m in models}
            if device == "cuda" and any(p != "CUDAExecutionProvider" for p in used.values()):
                raise SystemExit(f"--device cuda did not put every model on CUDA: {used}")
            for (base, rows_in, model), value in answers(server.http_port, models).items():
                found[(base, rows_in, model if device == "cuda" else f"{model}@cpu")] = value
            for model in models:
                for concurrency in (1, 64):
                    r = perf_analyzer(model, server.grpc_port, concurrency, args.interval_ms, f"pa_gpu_{device}.csv")
                    rows.append(f"| {device} ({used[model]}) | {model} | {concurrency} | {r['rate']:,.0f} | "
                                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
                    print(rows[-1], flush=True)
        finally:
            stop_server(server.process)
    print(check_answers({k: v for k, v in found.items() if "@" not in k[2] or k[2] in ("mlp@cpu", "cnn@cpu")}))
    print(f"\nperf_analyzer over gRPC, batch 1 per request, --workers {args.workers}, {args.interval_ms} ms windows\n")
    print("| device (provider) | model | concurrency | infer/s | p50 ms | p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
