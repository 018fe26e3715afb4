"""Does batching cost latency at low load? (issue 15): `python bench/run_adaptive_delay.py [--rounds 3]
[--interval-ms 3000] [--workers 2] [--concurrency 1 4 64]`.

One ortserve (`--workers 2`) serving bench/models.py's MLP three ways: `mlp` (dynamic batching, no queue
delay), `mlp_delay1ms` (max_queue_delay_microseconds 1000 with the adaptive delay, the default) and
`mlp_delay1ms_fixed` (the same delay always waited out, as Triton does: `adaptive_queue_delay: false`),
plus the bare grpc.aio echo server (2 processes, uvloop) as the transport's floor. Each round measures, with
perf_analyzer over gRPC, batch 1 per request, every model at each concurrency (1, 4 and 64 unless told) and the
echo at concurrency 1. Prints the medians over rounds and the issue's checks: at c=1, the p50 of the adaptive delay
minus the no-delay p50 (target within 0.15 ms) and over the echo's p50 (target at most 2.5x); at every
concurrency between, the same difference (a small closed group of clients, which the adaptive delay stops
waiting for once all of it is queued); at c=64, the adaptive delay's throughput over the fixed delay's (target at
least 1.0). Needs bench/setup_perf_analyzer.sh.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import bench_repository, perf_analyzer, start_echo, start_ortserve, stop  # noqa: E402

MODELS = ("mlp", "mlp_delay1ms", "mlp_delay1ms_fixed")
ECHO_PORT = 8101


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 64], help="must include 1 and 64")
    args = parser.parse_args()
    if not {1, 64} <= set(args.concurrency):
        parser.error("--concurrency must include 1 and 64 (the issue's checks)")
    repo = bench_repository(*MODELS)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    server, port = start_ortserve(repo, args.workers)
    try:
        for round_index in range(args.rounds):
            echo = start_echo(ECHO_PORT, 2, uvloop=True)
            try:
                runs.setdefault(("echo", 1), []).append(perf_analyzer("mlp", ECHO_PORT, 1, args.interval_ms))
            finally:
                stop(echo)
            for model in MODELS:
                for concurrency in args.concurrency:
                    result = perf_analyzer(model, port, concurrency, args.interval_ms, f"pa_adaptive_{model}.csv")
                    runs.setdefault((model, concurrency), []).append(result)
            line = ", ".join(f"{m} c={c}: {r[-1]['rate']:.0f}/s p50 {r[-1]['p50_ms']:.3f} ms"
                             for (m, c), r in runs.items())
            print(f"round {round_index + 1}: {line}", flush=True)
    finally:
        stop(server)
    med = {key: {k: statistics.median(r[k] for r in results) for k in ("rate", "p50_ms", "p99_ms")}
           for key, results in runs.items()}
    print(f"\nMLP, perf_analyzer over gRPC, batch 1 per request, ortserve --workers {args.workers}, "
          f"{args.rounds} rounds, medians\n")
    print("| server / model | concurrency | infer/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for (model, concurrency), figures in med.items():
        cells = f"{figures['rate']:,.0f} | {figures['p50_ms']:.3f} | {figures['p99_ms']:.3f}"
        print(f"| {model} | {concurrency} | {cells} |")
    adaptive, none, fixed = med[("mlp_delay1ms", 1)], med[("mlp", 1)], med[("mlp_delay1ms_fixed", 1)]
    echo_p50 = med[("echo", 1)]["p50_ms"]
    print("\n| check | figure | target |")
    print("|---|---:|---|")
    print(f"| c=1 p50: adaptive 1 ms delay - no delay | {adaptive['p50_ms'] - none['p50_ms']:+.3f} ms | <= 0.15 ms |")
    print(f"| c=1 p50: fixed 1 ms delay - no delay | {fixed['p50_ms'] - none['p50_ms']:+.3f} ms | (Triton's way) |")
    print(f"| c=1 p50: adaptive / echo | {adaptive['p50_ms'] / echo_p50:.2f}x | <= 2.5x |")
    for concurrency in sorted(c for c in args.concurrency if 1 < c < 64):
        a, n = med[("mlp_delay1ms", concurrency)], med[("mlp", concurrency)]
        f = med[("mlp_delay1ms_fixed", concurrency)]
        print(f"| c={concurrency} p50: adaptive - no delay (fixed - no delay) | {a['p50_ms'] - n['p50_ms']:+.3f} ms "
              f"({f['p50_ms'] - n['p50_ms']:+.3f} ms) | (a closed group) |")
    ratio = med[("mlp_delay1ms", 64)]["rate"] / med[("mlp_delay1ms_fixed", 64)]["rate"]
    print(f"| c=64 infer/s: adaptive / fixed delay | {ratio:.3f} | >= 1.0 |")


if __name__ == "__main__":
    main()
