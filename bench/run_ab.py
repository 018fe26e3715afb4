"""A/B of two ortserve builds or settings, served side by side: `python bench/run_ab.py [A_DIR] [B_DIR] [options]`.

How every "B/A" row of docs/benchmarks.md's request-path tables was measured. A_DIR and B_DIR are checkouts
(directories holding `server/`; both default to this one); `--a-args` / `--b-args` add server flags to one side
(e.g. `--a-args="--cpu-affinity none"` compares the pinned workers with unpinned ones in one checkout). Both
servers run `--workers 2` for the whole run on a repository holding one model of bench/models.py (`--model`,
default `mlp_delay1ms`; copied into bench/out/ab_repo). For each concurrency, after a short warm-up of each, every
round measures both with perf_analyzer over gRPC (batch 1 per request, exactly 12,000 requests at c=64 or 3,000
at c=1), A first in even rounds and B first in odd ones. Prints each round (requests/s, server CPU per request
over every thread from /proc, average batch, p50) and the medians of B/A.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import profile_breakdown as breakdown  # noqa: E402
from run_batching import OUT, ROOT, bench_repository  # noqa: E402
from run_metrics_overhead import start_server, stop_server  # noqa: E402


def ab_repository(model: str) -> Path:
    """bench/out/ab_repo holding `model` alone, so each worker loads one model and has few threads."""
    source = bench_repository(model) / model
    repo = OUT / "ab_repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(source, repo / model)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a_dir", nargs="?", type=Path, default=ROOT)
    parser.add_argument("b_dir", nargs="?", type=Path, default=ROOT)
    parser.add_argument("--a-args", default="", help="extra server flags for A, one string")
    parser.add_argument("--b-args", default="", help="extra server flags for B, one string")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--model", default="mlp_delay1ms")
    args = parser.parse_args()
    breakdown.MODEL = args.model  # the model perf_analyzer drives and whose statistics count the requests
    repo = ab_repository(args.model)
    servers: dict[str, breakdown.Server] = {}
    try:
        for label, source, extra in (("A", args.a_dir, args.a_args), ("B", args.b_dir, args.b_args)):
            started = start_server(f"ab{label}", source.resolve(), repo, 2, shlex.split(extra))
            server = breakdown.Server(label, started.process, started.grpc_port)
            server.pids = breakdown.process_tree(started.process.pid)
            servers[label] = server
        names = breakdown.python_thread_names([pid for s in servers.values() for pid in s.pids])
        for concurrency in args.concurrency:
            requests = 12000 if concurrency > 1 else 3000
            for server in servers.values():
                breakdown.measure(server, concurrency, requests // 6, names)  # warm-up
            rates, cpus, p50s = [], [], []
            for index in range(args.rounds):
                order = list(servers.items())[:: 1 if index % 2 == 0 else -1]
                result = {label: breakdown.measure(server, concurrency, requests, names) for label, server in order}
                a, b = result["A"], result["B"]
                rates.append(b.rate / a.rate)
                cpus.append(b.cpu_us / a.cpu_us)
                p50s.append(b.p50_ms / a.p50_ms)
                print(f"c={concurrency} round {index + 1}: A {a.rate:,.0f}/s {a.cpu_us:.0f} us batch {a.batch:.1f} "
                      f"p50 {a.p50_ms:.2f} ms | B {b.rate:,.0f}/s {b.cpu_us:.0f} us batch {b.batch:.1f} "
                      f"p50 {b.p50_ms:.2f} ms", flush=True)
            print(f"c={concurrency}: median B/A requests/s {statistics.median(rates):.3f}, CPU per request "
                  f"{statistics.median(cpus):.3f}, p50 {statistics.median(p50s):.3f}", flush=True)
    finally:
        for server in servers.values():
            stop_server(server.process)


if __name__ == "__main__":
    main()
