"""Does ONNX Runtime's intra-op pool pay for itself on a small model? `python bench/run_intra_op_ab.py [--rounds 4]`.

bench/profile_breakdown.py shows the MLP's worker spending CPU per request in ONNX Runtime's pool
threads and in waking them. Two servers (`--workers 2` each, the MLP alone) run side by side: A with
the server's default intra-op thread count, B with `intra_op_thread_count: 1` (the caller's thread
alone). Rounds interleave A and B at concurrency 1 and 64 (perf_analyzer over gRPC, batch 1 per
request, `--request-count`), measuring the server's CPU per request (/proc, every thread) and the
throughput; prints each round's B/A ratios and their medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from profile_breakdown import (  # noqa: E402
    OUT,
    Measured,
    load_average,
    measure,
    profile_repo,
    python_thread_names,
    start_ortserve,
)
from run_batching import stop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests-c1", type=int, default=3000)
    parser.add_argument("--requests-c64", type=int, default=16000)
    args = parser.parse_args()
    print(f"load average before: {load_average()}", flush=True)
    servers = {
        "A (default)": start_ortserve(profile_repo(), 2, OUT / "intra_a_port"),
        "B (intra_op 1)": start_ortserve(profile_repo(1), 2, OUT / "intra_b_port"),
    }
    names = python_thread_names([pid for server in servers.values() for pid in server.pids])
    results: dict[tuple[str, int], list[Measured]] = {}
    try:
        for concurrency, requests in ((1, args.requests_c1), (64, args.requests_c64)):
            for server in servers.values():
                measure(server, concurrency, max(200, requests // 10), names)  # warm-up
            for round_index in range(args.rounds):
                # Alternate which goes first, so a drift in the machine's load favours neither.
                order = list(servers.items())[:: 1 if round_index % 2 == 0 else -1]
                for label, server in order:
                    results.setdefault((label, concurrency), []).append(measure(server, concurrency, requests, names))
                a, b = (results[(label, concurrency)][-1] for label in servers)
                print(f"c={concurrency} round {round_index + 1}: CPU/request A {a.cpu_us:.0f} us, B {b.cpu_us:.0f} us; "
                      f"infer/s A {a.rate:,.0f}, B {b.rate:,.0f}; p50 A {a.p50_ms:.2f} ms, B {b.p50_ms:.2f} ms",
                      flush=True)
    finally:
        for server in servers.values():
            stop(server.process)
    print(f"\nload average after: {load_average()}\n")
    print("| concurrency | CPU us/request A / B (medians) | B/A CPU per request (each round) | median | "
          "B/A infer/s (each round) | median | p50 ms A / B |")
    print("|---:|---|---|---:|---|---:|---|")
    labels = list(servers)
    for concurrency in (1, 64):
        runs_a, runs_b = results[(labels[0], concurrency)], results[(labels[1], concurrency)]
        cpu = [b.cpu_us / a.cpu_us for a, b in zip(runs_a, runs_b, strict=True)]
        rate = [b.rate / a.rate for a, b in zip(runs_a, runs_b, strict=True)]
        med_a = statistics.median(r.cpu_us for r in runs_a)
        med_b = statistics.median(r.cpu_us for r in runs_b)
        p50 = f"{statistics.median(r.p50_ms for r in runs_a):.2f} / {statistics.median(r.p50_ms for r in runs_b):.2f}"
        print(f"| {concurrency} | {med_a:.0f} / {med_b:.0f} | {', '.join(f'{r:.2f}' for r in cpu)} | "
              f"{statistics.median(cpu):.2f} | {', '.join(f'{r:.2f}' for r in rate)} | {statistics.median(rate):.2f} "
              f"| {p50} |")
    print("\n| concurrency | thread | A us/request | B us/request |\n|---:|---|---:|---:|")
    for concurrency in (1, 64):
        runs_a, runs_b = results[(labels[0], concurrency)], results[(labels[1], concurrency)]
        for role in sorted({r for m in runs_a + runs_b for r in m.roles}):
            a = statistics.median(m.roles.get(role, 0.0) for m in runs_a)
            b = statistics.median(m.roles.get(role, 0.0) for m in runs_b)
            if a or b:
                print(f"| {concurrency} | {role} | {a:.0f} | {b:.0f} |")


if __name__ == "__main__":
    main()
