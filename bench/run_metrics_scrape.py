"""How long a scrape of a server with 50 models takes (issue 12): `python bench/run_metrics_scrape.py
[--models 50] [--scrapes 200] [--workers 2 1] [--requests 3]`.

Builds a repository of `--models` copies of bench/models.py's MLP (`mlp_00`, `mlp_01`, ...: the same model file,
hard-linked, and the same config under each name), starts ortserve on it for each `--workers` setting, sends
`--requests` KServe requests per model over HTTP and as many over gRPC (so every model has counts and latency
histograms in both front ends, spread over the workers), then times `--scrapes` sequential GETs of /metrics on
the metrics port over one keep-alive connection. Prints p50/p95/max in ms, the server's CPU time per scrape (all
its processes), and the exposition's size, and runs
`promtool check metrics` on one exposition when promtool is installed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import OUT, PYTHON, ROOT  # noqa: E402
from run_metrics_overhead import Server, group_cpu_s, http_get, start_server, stop_server  # noqa: E402


def build_repository(source: Path, target: Path, count: int) -> list[str]:
    """`count` copies of the model at `source`, named mlp_00 ...; returns the names."""
    names = [f"mlp_{i:02d}" for i in range(count)]
    if target.exists():
        shutil.rmtree(target)
    config = (source / "config.pbtxt").read_text()
    for name in names:
        (target / name / "1").mkdir(parents=True)
        os.link(source / "1" / "model.onnx", target / name / "1" / "model.onnx")
        (target / name / "config.pbtxt").write_text(config.replace(f'name: "{source.name}"', f'name: "{name}"'))
    return names


def wait_ready(server: Server, names: list[str], timeout_s: float = 300) -> None:
    """Every model answers ready over HTTP (the port file may come before the last model is loaded)."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while http_get(server.http_port, f"/v2/models/{name}/ready")[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {name} not ready")
            time.sleep(0.2)


def send_requests(server: Server, names: list[str], per_model: int) -> None:
    """`per_model` HTTP (each on a new connection, so they spread over the workers) and gRPC requests per model."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    body = json.dumps({"inputs": [{"name": "INPUT", "shape": [1, 256], "datatype": "FP32", "data": [0.5] * 256}]})
    for name in names:
        for _ in range(per_model):
            connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
            connection.request("POST", f"/v2/models/{name}/infer", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status != 200:
                raise RuntimeError(f"HTTP infer on {name}: {response.status}")
    tensor = grpcclient.InferInput("INPUT", [1, 256], "FP32")
    tensor.set_data_from_numpy(np.full((1, 256), 0.5, dtype=np.float32))
    for _ in range(per_model):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")  # a new channel each pass
        for name in names:
            client.infer(name, [tensor])
        client.close()


def time_scrapes(port: int, count: int) -> tuple[list[float], bytes]:
    """`count` sequential GET /metrics on one keep-alive connection: durations (ms) and the last body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    durations: list[float] = []
    body = b""
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            body = response.read()
            durations.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"scrape answered {response.status}")
    finally:
        connection.close()
    return durations, body


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def promtool_check(exposition: bytes) -> str:
    """`promtool check metrics` on one exposition (its lint findings), or why it did not run."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return "promtool not installed"
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=120)
    output = (result.stdout + result.stderr).decode(errors="replace").strip()
    return f"exit {result.returncode}" + (f"\n{output}" if output else " (no findings)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1], help="ortserve --workers settings (2 1)")
    parser.add_argument("--requests", type=int, default=3, help="requests per model and protocol before scraping")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    source = OUT / "repo" / "mlp"
    if not source.exists():
        subprocess.run([PYTHON, str(BENCH / "models.py"), "--out", str(OUT / "repo")], cwd=ROOT, check=True)
    names = build_repository(source, OUT / f"repo_{args.models}_mlp", args.models)
    rows: list[str] = []
    for workers in args.workers:
        server = start_server(f"scrape{workers}", ROOT, OUT / f"repo_{args.models}_mlp", workers, [])
        try:
            wait_ready(server, names)
            send_requests(server, names, args.requests)
            assert server.metrics_port is not None
            cpu_s = group_cpu_s(server.process.pid)
            durations, body = time_scrapes(server.metrics_port, args.scrapes)
            # The server's own CPU per scrape (all its processes): steadier than the wall time on a busy machine.
            cpu_ms = (group_cpu_s(server.process.pid) - cpu_s) / len(durations) * 1000
        finally:
            stop_server(server.process)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        rows.append(f"| {workers} | {args.models} | {len(durations)} | {statistics.median(durations):.2f} | "
                    f"{percentile(durations, 0.95):.2f} | {max(durations):.2f} | {cpu_ms:.1f} | {len(body):,} | "
                    f"{series:,} |")
        print(f"--workers {workers}: p50 {statistics.median(durations):.2f} ms, done", flush=True)
        if workers == args.workers[0]:
            (OUT / f"metrics_{args.models}_models.txt").write_bytes(body)
            print(f"promtool check metrics (--workers {workers}): {promtool_check(body)}", flush=True)
    print("\n| workers | models | scrapes | p50 ms | p95 ms | max ms | server CPU ms/scrape | bytes | samples |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
