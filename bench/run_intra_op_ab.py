"""Do two workers on two CPUs do better with one intra-op thread each? `python bench/run_intra_op_ab.py [--rounds 3]`.

Two `--workers 2` servers run side by side, each serving `mlp_delay1ms` and `cnn_delay1ms` from
bench/models.py: A with `intra_op_thread_count: 0` (ONNX Runtime's own choice, its physical cores, in
every worker: the default before the workers divided the CPUs) and B with the server's default (each
worker's share of the CPUs, `cpus.share_among`). Rounds alternate A and B at concurrency 64
(perf_analyzer over gRPC, batch 1 per request, `--request-count`), measuring the server's CPU per request
(/proc, every thread), the throughput and the average batch; prints each round's B/A ratios and medians.

`--alone` first prints ONNX Runtime alone in this process: wall time and CPU per run at batch 1 to 64,
with one intra-op thread and with ONNX Runtime's choice (`intra_op_num_threads` 1 and 0, no spinning).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import profile_breakdown  # noqa: E402
from profile_breakdown import (  # noqa: E402
    OUT,
    Measured,
    copy_model,
    load_average,
    measure,
    python_thread_names,
    start_ortserve,
)
from run_batching import stop  # noqa: E402

MODELS = {"mlp_delay1ms": (256,), "cnn_delay1ms": (3, 32, 32)}


def repository(label: str, intra_op_threads: int | None) -> Path:
    """bench/out/intra_<label>: the two models, with `intra_op_thread_count` when given."""
    source, repo = OUT / "repo", OUT / f"intra_{label}"
    if not all((source / name).exists() for name in MODELS):
        raise SystemExit(f"run `python bench/models.py` first ({source} lacks {', '.join(MODELS)})")
    shutil.rmtree(repo, ignore_errors=True)
    for name in MODELS:
        copy_model(source / name, repo / name, intra_op_threads)
    return repo


def alone(runs: int = 300) -> None:
    """ONNX Runtime alone: wall and CPU per run by batch size, one thread against ORT's choice."""
    import onnxruntime as ort

    print("| model | batch | wall us, 1 thread | wall us, ORT's choice | CPU us, 1 thread | CPU us, ORT's choice |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, shape in MODELS.items():
        sessions = []
        for threads in (1, 0):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions.append(ort.InferenceSession(str(OUT / "repo" / name / "1" / "model.onnx"), options,
                                                 providers=["CPUExecutionProvider"]))
        for batch in (1, 2, 4, 8, 16, 32, 64):
            feed = {"INPUT": np.random.default_rng(0).random((batch, *shape), np.float32)}
            timings = []
            for session in sessions:
                for _ in range(20):
                    session.run(None, feed)
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(runs):
                    session.run(None, feed)
                timings.append(((time.perf_counter() - wall) / runs * 1e6, (time.process_time() - cpu) / runs * 1e6))
            (wall_1, cpu_1), (wall_0, cpu_0) = timings
            print(f"| {name} | {batch} | {wall_1:.0f} | {wall_0:.0f} | {cpu_1:.0f} | {cpu_0:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12000)
    parser.add_argument("--alone", action="store_true", help="first measure ONNX Runtime alone in this process")
    args = parser.parse_args()
    if args.alone:
        alone()
    print(f"load average before: {load_average()}", flush=True)
    servers = {
        "A (ORT's choice)": start_ortserve(repository("a", 0), 2, OUT / "intra_a_port"),
        "B (default)": start_ortserve(repository("b", None), 2, OUT / "intra_b_port"),
    }
    names = python_thread_names([pid for server in servers.values() for pid in server.pids])
    results: dict[tuple[str, str], list[Measured]] = {}
    try:
        for model in MODELS:
            profile_breakdown.MODEL = model  # what perf_analyzer asks for and whose statistics count
            for server in servers.values():
                measure(server, 64, max(200, args.requests // 10), names)  # warm-up
            for round_index in range(args.rounds):
                # Alternate which goes first, so a drift in the machine's load favours neither.
                order = list(servers.items())[:: 1 if round_index % 2 == 0 else -1]
                for label, server in order:
                    results.setdefault((label, model), []).append(measure(server, 64, args.requests, names))
                a, b = (results[(label, model)][-1] for label in servers)
                print(f"{model} round {round_index + 1}: infer/s A {a.rate:,.0f}, B {b.rate:,.0f}; CPU/request "
                      f"A {a.cpu_us:.0f} us, B {b.cpu_us:.0f} us; batch A {a.batch:.1f}, B {b.batch:.1f}", flush=True)
    finally:
        for server in servers.values():
            stop(server.process)
    print(f"\nload average after: {load_average()}\n")
    print("| model (c=64) | B/A infer/s (each round) | median | B/A CPU per request (each round) | median |")
    print("|---|---|---:|---|---:|")
    labels = list(servers)
    for model in MODELS:
        runs_a, runs_b = results[(labels[0], model)], results[(labels[1], model)]
        rate = [b.rate / a.rate for a, b in zip(runs_a, runs_b, strict=True)]
        cpu = [b.cpu_us / a.cpu_us for a, b in zip(runs_a, runs_b, strict=True)]
        print(f"| {model} | {', '.join(f'{r:.3f}' for r in rate)} | {statistics.median(rate):.3f} | "
              f"{', '.join(f'{r:.3f}' for r in cpu)} | {statistics.median(cpu):.3f} |")


if __name__ == "__main__":
    main()
