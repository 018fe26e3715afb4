"""ortserve's HTTP front end against NVIDIA Triton's, in one run: `python bench/run_http_vs_triton.py
[--interval-ms 4000] [--rounds 2] [--model mlp] [--workers 2] [--concurrency 64]`.

Serves bench/models.py's MLP with ortserve (`--workers 2` by default, as bench/run_http.py) and with Triton through
PyTriton (bench/pytriton_server.py: one instance, Triton's Python backend running ONNX Runtime; its docstring says
what is and is not the same), both up for the whole run, and drives them with perf_analyzer at concurrency 64,
batch 1 per request: ortserve over HTTP, ortserve over gRPC, Triton over HTTP. Each round measures the three in
turn, the order rotating from round to round, so that drift on a shared machine hits all of them alike; the
table reports the median over rounds (the per-round figures are printed too) and the ratios ortserve HTTP /
Triton HTTP and ortserve HTTP / ortserve gRPC. Needs bench/setup_perf_analyzer.sh and bench/setup_pytriton.sh.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import OUT, PYTHON, ROOT, stop  # noqa: E402
from run_http import perf_analyzer, start  # noqa: E402

PYTRITON_PYTHON = BENCH / "tools" / "pytriton-venv" / "bin" / "python"


def free_ports(count: int) -> list[int]:
    """Ports free now on 127.0.0.1 (tritonserver takes no port 0, so they are chosen here)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_pytriton(model_dir: Path, max_queue_delay_us: int = 0) -> tuple[subprocess.Popen[bytes], int, int]:
    """bench/pytriton_server.py in its own process group; returns the process, its HTTP port and its gRPC port."""
    if not PYTRITON_PYTHON.exists():
        raise SystemExit("no PyTriton venv: run bash bench/setup_pytriton.sh")
    http_port, grpc_port, metrics_port = free_ports(3)
    ready = OUT / f"pytriton_{model_dir.name}_ready"
    ready.unlink(missing_ok=True)
    log_path = OUT / f"pytriton_{model_dir.name}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [str(PYTRITON_PYTHON), str(BENCH / "pytriton_server.py"), "--model-dir", str(model_dir),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
         "--ready-file", str(ready), "--max-queue-delay-us", str(max_queue_delay_us)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 300
    while not (ready.exists() and ready.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_pytriton(process)
            raise RuntimeError(f"PyTriton did not start; see {log_path}")
        time.sleep(0.2)
    return process, http_port, grpc_port


def stop_pytriton(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to pytriton_server.py, which stops tritonserver itself; the whole group is killed if it hangs."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # leftovers (tritonserver, backend stubs) in its session
    except ProcessLookupError:
        pass
    process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", help="a model of bench/models.py (default mlp)")
    parser.add_argument("--workers", type=int, default=2, help="ortserve --workers (default 2, as run_http.py)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer measurement window")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the three targets (default 2)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    repo = OUT / "repo"
    if not (repo / args.model).exists():
        subprocess.run([PYTHON, str(BENCH / "models.py"), "--out", str(repo)], cwd=ROOT, check=True)

    ortserve, grpc_port, http_port = start(repo, args.workers)
    triton = None
    try:
        triton, triton_http_port, _ = start_pytriton(repo / args.model)
        targets = [
            ("ortserve HTTP", "http", f"127.0.0.1:{http_port}"),
            ("ortserve gRPC", "grpc", f"127.0.0.1:{grpc_port}"),
            ("Triton HTTP (PyTriton)", "http", f"127.0.0.1:{triton_http_port}"),
        ]
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in targets}
        for round_index in range(args.rounds):
            shift = round_index % len(targets)
            for name, protocol, address in targets[shift:] + targets[:shift]:
                result = perf_analyzer(protocol, args.model, address, args.concurrency, args.interval_ms)
                results[name].append(result)
                print(f"round {round_index + 1}: {name}: {result['rate']:.0f} infer/s, "
                      f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms", flush=True)
    finally:
        if triton is not None:
            stop_pytriton(triton)
        stop(ortserve)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\n{args.model}, concurrency {args.concurrency}, batch 1 per request, perf_analyzer "
          f"({args.interval_ms} ms windows), {args.rounds} round(s), median over rounds")
    print(f"ortserve: --workers {args.workers} (each worker one instance); Triton: PyTriton, one instance, "
          "Python backend running ONNX Runtime\n")
    print("| server / protocol | infer/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for name, _, _ in targets:
        print(f"| {name} | {median(name, 'rate'):.0f} | {median(name, 'p50_ms'):.2f} | {median(name, 'p99_ms'):.2f} |")
    ort_http = median("ortserve HTTP", "rate")
    print(f"\nortserve HTTP / Triton HTTP throughput: {ort_http / median('Triton HTTP (PyTriton)', 'rate'):.2f}")
    print(f"ortserve HTTP / ortserve gRPC throughput: {ort_http / median('ortserve gRPC', 'rate'):.2f}")


if __name__ == "__main__":
    main()
