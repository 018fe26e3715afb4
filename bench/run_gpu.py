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
    for device in ("cuda", "cpu"):
        server = start_server(f"gpu_{device}", ROOT, repo, args.workers, ["--device", device])
        try:
            models = MODELS + GRAPH_MODELS if device == "cuda" else MODELS
            used = {m: provider(server.http_port, m) for m in models}
            if device == "cuda" and any(p != "CUDAExecutionProvider" for p in used.values()):
                raise SystemExit(f"--device cuda did not put every model on CUDA: {used}")
            for model in models:
                for concurrency in (1, 64):
                    r = perf_analyzer(model, server.grpc_port, concurrency, args.interval_ms, f"pa_gpu_{device}.csv")
                    rows.append(f"| {device} ({used[model]}) | {model} | {concurrency} | {r['rate']:,.0f} | "
                                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
                    print(rows[-1], flush=True)
        finally:
            stop_server(server.process)
    print(f"\nperf_analyzer over gRPC, batch 1 per request, --workers {args.workers}, {args.interval_ms} ms windows\n")
    print("| device (provider) | model | concurrency | infer/s | p50 ms | p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
