"""Issue 15's table in one command: ortserve against Triton (PyTriton) and the bare gRPC transport, same run.
`python bench/run_vs_triton.py [--rounds 2] [--interval-ms 3000] [--workers 2]`.

Starts, all up for the whole run, each in its own process group:
- the echo server (bench/echo_server.py, 2 processes, uvloop): gRPC and protobuf alone, the transport ceiling;
- Triton through PyTriton 0.7 (bench/pytriton_server.py, one instance, Python backend running ONNX Runtime),
  twice: the MLP and the CNN, each with `max_queue_delay_microseconds: 1000`;
- ortserve (`--workers 2`, one instance per worker) serving bench/models.py's `mlp_delay1ms` and
  `cnn_delay1ms` (the same 1 ms delay; ortserve's delay adapts, see README "Scheduling").
Every target is driven by perf_analyzer over gRPC, batch 1 per request: MLP at concurrency 1 and 64, CNN at
concurrency 64 (the echo answers the MLP only). Rounds rotate the order; medians over rounds are reported, with
each server's CPU seconds per request at concurrency 64 (all processes of its group, from /proc) and the issue's
targets as ratios of this run. Client and servers share the machine's cores, as in the issue's table.
Needs bench/setup_perf_analyzer.sh and bench/setup_pytriton.sh.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import ROOT, bench_repository, perf_analyzer, start_echo, stop  # noqa: E402
from run_http_vs_triton import start_pytriton, stop_pytriton  # noqa: E402
from run_metrics_overhead import group_cpu_s, start_server, stop_server  # noqa: E402

DELAY_US = 1000
ECHO_PORT = 8101


@dataclass
class Target:
    """A server under test: its name, gRPC port, process group, and the model name per benchmark model."""

    name: str
    port: int
    pgid: int
    models: dict[str, str]
    stop: Callable[[], None]


def start_targets(repo: Path, workers: int) -> list[Target]:
    targets: list[Target] = []
    try:
        echo = start_echo(ECHO_PORT, 2, uvloop=True)
        targets.append(Target("echo (grpc.aio, 2 processes, uvloop)", ECHO_PORT, echo.pid, {"mlp": "mlp"},
                              lambda: stop(echo)))
        for model in ("mlp", "cnn"):
            process, _, port = start_pytriton(repo / model, DELAY_US)
            targets.append(Target(f"Triton (PyTriton 0.7) {model}", port, process.pid, {model: model},
                                  lambda p=process: stop_pytriton(p)))  # type: ignore[misc]
        server = start_server("vs_triton", ROOT, repo, workers, [])
        targets.append(Target(f"ortserve (--workers {workers})", server.grpc_port, server.process.pid,
                              {"mlp": "mlp_delay1ms", "cnn": "cnn_delay1ms"}, lambda: stop_server(server.process)))
    except BaseException:
        for target in targets:
            target.stop()
        raise
    return targets


def measure(target: Target, model: str, concurrency: int, interval_ms: int) -> dict[str, float]:
    """perf_analyzer's figures plus the server group's CPU microseconds per request over the measurement."""
    before = group_cpu_s(target.pgid)
    started = time.monotonic()
    result = perf_analyzer(target.models[model], target.port, concurrency, interval_ms, "pa_vs_triton.csv")
    elapsed = time.monotonic() - started
    # perf_analyzer's warm-up and trials run at about the measured rate, so requests ~ rate * elapsed.
    result["cpu_us"] = (group_cpu_s(target.pgid) - before) / max(1.0, result["rate"] * elapsed) * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    repo = bench_repository("mlp", "cnn", "mlp_delay1ms", "cnn_delay1ms")
    targets = start_targets(repo, args.workers)
    cases = [(t, m, c) for t in targets for m in t.models for c in ((1, 64) if m == "mlp" else (64,))]
    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    try:
        for round_index in range(args.rounds):
            shift = round_index % len(cases)
            for target, model, concurrency in cases[shift:] + cases[:shift]:
                result = measure(target, model, concurrency, args.interval_ms)
                runs.setdefault((target.name, model, concurrency), []).append(result)
                print(f"round {round_index + 1}: {target.name} {model} c={concurrency}: {result['rate']:,.0f}/s, "
                      f"p50 {result['p50_ms']:.2f} ms, CPU {result['cpu_us']:.0f} us/request", flush=True)
    finally:
        for target in targets:
            target.stop()

    def med(name: str, model: str, concurrency: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(name, model, concurrency)])

    echo, mlp_triton, cnn_triton, ours = (t.name for t in targets)
    print(f"\nperf_analyzer over gRPC, batch 1 per request, {args.rounds} round(s), medians; "
          f"dynamic batching with a {DELAY_US} us queue delay\n")
    print("| server | MLP c=1 p50 ms | MLP c=64 infer/s | CNN c=64 infer/s | CPU us/request (MLP c=64) |")
    print("|---|---:|---:|---:|---:|")
    rows = [(echo, echo, None), ("Triton (PyTriton 0.7)", mlp_triton, cnn_triton), (ours, ours, ours)]
    for label, mlp_name, cnn_name in rows:
        cnn = f"{med(cnn_name, 'cnn', 64, 'rate'):,.0f}" if cnn_name else "-"
        print(f"| {label} | {med(mlp_name, 'mlp', 1, 'p50_ms'):.2f} | {med(mlp_name, 'mlp', 64, 'rate'):,.0f} | "
              f"{cnn} | {med(mlp_name, 'mlp', 64, 'cpu_us'):.0f} |")
    print("\n| target | this run | goal |")
    print("|---|---:|---|")
    print(f"| MLP c=64: ortserve / PyTriton | {med(ours, 'mlp', 64, 'rate') / med(mlp_triton, 'mlp', 64, 'rate'):.2f}x"
          " | >= 2x |")
    print(f"| MLP c=64: ortserve / echo | {med(ours, 'mlp', 64, 'rate') / med(echo, 'mlp', 64, 'rate'):.0%} | >= 60% |")
    print(f"| CNN c=64: ortserve / PyTriton | {med(ours, 'cnn', 64, 'rate') / med(cnn_triton, 'cnn', 64, 'rate'):.2f}x"
          " | >= 2x |")
    print(f"| MLP c=1 p50: ortserve / echo | {med(ours, 'mlp', 1, 'p50_ms') / med(echo, 'mlp', 1, 'p50_ms'):.2f}x"
          " | <= 2.5x |")
    print(f"| CPU per request at c=64: ortserve / echo | "
          f"{med(ours, 'mlp', 64, 'cpu_us') / med(echo, 'mlp', 64, 'cpu_us'):.2f}x | <= 2x |")


if __name__ == "__main__":
    main()
