"""HTTP against gRPC in one run: `python bench/run_http.py [--interval-ms 4000] [--model mlp] [--workers 2]`.

Serves bench/models.py's MLP with ortserve and drives it with perf_analyzer at concurrency 64
over HTTP (`-i http`, JSON header + binary tensors, as tritonclient.http sends) and over gRPC,
against the same server process(es), one after the other. Prints both rates, p50/p99 latencies
and the HTTP/gRPC ratio. Needs bench/setup_perf_analyzer.sh to have run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import OUT, PYTHON, ROOT, perf_env, read_perf_csv, stop  # noqa: E402


def perf_analyzer(protocol: str, model: str, address: str, concurrency: int, interval_ms: int) -> dict[str, float]:
    """One perf_analyzer measurement over `protocol` (http or grpc)."""
    csv_path = OUT / f"pa_{protocol}.csv"
    csv_path.unlink(missing_ok=True)
    command = [
        str(BENCH / "tools" / "perf_analyzer"), "-m", model, "-i", protocol, "-u", address,
        "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
        "--max-trials", "10", "-s", "30", "-f", str(csv_path),
    ]
    result = subprocess.run(command, env=perf_env(), capture_output=True, text=True, timeout=600)
    return read_perf_csv(csv_path, result)


def start(repo: Path, workers: int) -> tuple[subprocess.Popen[bytes], int, int]:
    """ortserve on free gRPC and HTTP ports; returns the process and both ports."""
    port_file = OUT / "http_bench_port"
    http_file = OUT / "http_bench_port.http"
    port_file.unlink(missing_ok=True)
    http_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [PYTHON, "-m", "server", "serve", "--model-repository", str(repo), "--host", "127.0.0.1", "--port", "0",
         "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file), "--workers", str(workers),
         "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.1)
    return process, int(port_file.read_text()), int(http_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="mlp", help="a model of bench/models.py (default mlp)")
    parser.add_argument("--workers", type=int, default=2, help="ortserve --workers (default 2)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer measurement window")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    repo = OUT / "repo"
    if not (repo / args.model).exists():
        subprocess.run([PYTHON, str(BENCH / "models.py"), "--out", str(repo)], cwd=ROOT, check=True)
    process, grpc_port, http_port = start(repo, args.workers)
    try:
        http = perf_analyzer("http", args.model, f"127.0.0.1:{http_port}", args.concurrency, args.interval_ms)
        grpc = perf_analyzer("grpc", args.model, f"127.0.0.1:{grpc_port}", args.concurrency, args.interval_ms)
    finally:
        stop(process)
    print(
        f"{args.model}, {args.workers} worker(s), concurrency {args.concurrency}, "
        "perf_analyzer, batch 1 per request\n"
    )
    print("| protocol | infer/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for name, result in (("HTTP", http), ("gRPC", grpc)):
        print(f"| {name} | {result['rate']:.0f} | {result['p50_ms']:.2f} | {result['p99_ms']:.2f} |")
    print(f"\nHTTP / gRPC throughput: {http['rate'] / grpc['rate']:.2f}")


if __name__ == "__main__":
    main()
