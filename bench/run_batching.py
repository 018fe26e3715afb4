"""The batching benchmark, end to end: `python bench/run_batching.py [--quick]`.

Runs, in one go on this machine (client and server sharing it):
1. ONNX Runtime alone (the in-process limit) on the MLP and the CNN;
2. a bare grpc.aio echo server (the transport limit), 1 and 2 processes, asyncio and uvloop;
3. ortserve with batching off (`<model>_nobatch`), on (`<model>`) and on with a 2 ms queue delay
   (`<model>_delay`), 1 and 2 workers, at concurrency 1, 4, 16 and 64, driven by perf_analyzer over gRPC.
Prints markdown tables (paste into docs/benchmarks.md) and writes bench/out/batching.md.
Needs bench/setup_perf_analyzer.sh to have run.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PYTHON = sys.executable


def bench_repository(*models: str) -> Path:
    """bench/out/repo, written by bench/models.py first when any of `models` is missing from it."""
    OUT.mkdir(exist_ok=True)
    repo = OUT / "repo"
    if not all((repo / m).exists() for m in models):
        subprocess.run([PYTHON, str(BENCH / "models.py"), "--out", str(repo)], cwd=ROOT, check=True)
    return repo


def perf_env() -> dict[str, str]:
    env = dict(os.environ)
    tools = BENCH / "tools"
    cudart = next((tools / "cuda").rglob("libcudart.so.12")).parent
    env["LD_LIBRARY_PATH"] = f"{cudart}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def perf_analyzer(
    model: str, port: int, concurrency: int, interval_ms: int, csv_name: str = "pa.csv"
) -> dict[str, float]:
    """One perf_analyzer measurement over gRPC; returns throughput and latency percentiles (ms)."""
    csv_path = OUT / csv_name
    csv_path.unlink(missing_ok=True)
    command = [
        str(BENCH / "tools" / "perf_analyzer"), "-m", model, "-i", "grpc", "-u", f"127.0.0.1:{port}",
        "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
        "--max-trials", "10", "-s", "30", "-f", str(csv_path),
    ]
    result = subprocess.run(command, env=perf_env(), capture_output=True, text=True, timeout=600)
    return read_perf_csv(csv_path, result)


def read_perf_csv(csv_path: Path, result: subprocess.CompletedProcess[str]) -> dict[str, float]:
    """Requests/s and p50/p99 latency (ms) from perf_analyzer's CSV (`-f`)."""
    if not csv_path.exists():
        # perf_analyzer exits non-zero when the run did not stabilise; its last window still counts.
        raise RuntimeError(f"perf_analyzer failed: {result.stdout[-2000:]} {result.stderr[-2000:]}")
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    return {
        "rate": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }


def wait_port_file(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if process.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.1)
    raise RuntimeError("server did not start")


def start_ortserve(repo: Path, workers: int, port_file: Path | None = None) -> tuple[subprocess.Popen, int]:
    """ortserve on free ports (log level warning); returns the process and its gRPC port."""
    port_file = port_file or OUT / "port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [PYTHON, "-m", "server", "serve", "--model-repository", str(repo), "--host", "127.0.0.1", "--port", "0",
         "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file), "--workers", str(workers),
         "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return process, wait_port_file(port_file, process)


def start_echo(port: int, workers: int, uvloop: bool) -> subprocess.Popen:
    command = [PYTHON, str(BENCH / "echo_server.py"), "--port", str(port), "--workers", str(workers)]
    if uvloop:
        command.append("--uvloop")
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(3)
    return process


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM) if process.pid == os.getpgid(process.pid) else process.terminate()
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 s windows, concurrency 1 and 64 only")
    args = parser.parse_args()
    repo = bench_repository(*(f"{m}{v}" for m in ("mlp", "cnn") for v in ("", "_delay", "_nobatch")))
    interval = 2000 if args.quick else 4000
    levels = [1, 64] if args.quick else [1, 4, 16, 64]
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    emit("### In-process limit (ONNX Runtime alone)\n")
    emit(subprocess.run([PYTHON, str(BENCH / "inprocess.py"), "--repo", str(repo), "--seconds", "2"],
                        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip())

    emit("\n### Transport limit (bare grpc.aio echo, MLP payload)\n")
    emit("| server | c=1 infer/s | c=1 p50 ms | c=64 infer/s | c=64 p50 ms |")
    emit("|---|---:|---:|---:|---:|")
    best_echo = 0.0
    for workers in (1, 2):
        for uvloop in (False, True):
            process = start_echo(8101, workers, uvloop)
            try:
                one = perf_analyzer("mlp", 8101, 1, interval)
                many = perf_analyzer("mlp", 8101, 64, interval)
            finally:
                stop(process)
            best_echo = max(best_echo, many["rate"])
            name = f"echo, {workers} process{'es' if workers > 1 else ''}, {'uvloop' if uvloop else 'asyncio'}"
            emit(f"| {name} | {one['rate']:,.0f} | {one['p50_ms']:.2f} | {many['rate']:,.0f} | {many['p50_ms']:.1f} |")

    results: dict[tuple[str, int, int], dict[str, float]] = {}
    for workers in (1, 2):
        process, port = start_ortserve(repo, workers)
        try:
            for model in ("mlp", "mlp_delay", "mlp_nobatch", "cnn", "cnn_delay", "cnn_nobatch"):
                for concurrency in levels:
                    results[(model, workers, concurrency)] = perf_analyzer(model, port, concurrency, interval)
        finally:
            stop(process)
    for base in ("mlp", "cnn"):
        emit(f"\n### ortserve, {base} (perf_analyzer, gRPC, batch 1 per request)\n")
        emit("| batching | workers | " + " | ".join(f"c={c} infer/s | c={c} p50 ms" for c in levels) + " |")
        emit("|---|---:|" + "---:|---:|" * len(levels))
        for model, label in ((f"{base}_nobatch", "off"), (base, "on"), (f"{base}_delay", "on, 2 ms delay")):
            for workers in (1, 2):
                cells = []
                for c in levels:
                    r = results[(model, workers, c)]
                    cells.append(f"{r['rate']:,.0f} | {r['p50_ms']:.2f}")
                emit(f"| {label} | {workers} | " + " | ".join(cells) + " |")
    best = max(results[("mlp", w, 64)]["rate"] for w in (1, 2))
    delayed = max(results[("mlp_delay", w, 64)]["rate"] for w in (1, 2))
    off = max(results[("mlp_nobatch", w, 64)]["rate"] for w in (1, 2))
    emit("\n### Ratios (MLP, concurrency 64, same run)\n")
    emit(f"- ortserve batching on (best workers setting) / best echo configuration: {best / best_echo:.2f}")
    emit(f"- the same with a 2 ms queue delay / best echo configuration: {delayed / best_echo:.2f}")
    emit(f"- ortserve batching on / batching off: {best / off:.2f} (with the 2 ms delay: {delayed / off:.2f})")
    for workers in (1, 2):
        emit(f"- ortserve c=1 p50 ({workers} worker{'s' if workers > 1 else ''}, batching on): "
             f"{results[('mlp', workers, 1)]['p50_ms']:.2f} ms")
    (OUT / "batching.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
