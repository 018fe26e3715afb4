"""What each layer of a request costs, rung by rung in one run: `python bench/run_ladder.py [--rounds 3]`.

Every rung is a gRPC server of 2 processes on uvloop, driven by perf_analyzer over gRPC with batch 1 per
request, at concurrency 64 (throughput, CPU per request) and 1 (p50), the rungs' order rotating per round:
1. echo, `--answer now`: parse the request, return canned bytes (bench/echo_server.py): the transport alone;
2. echo, `--answer later`: the handler awaits a future the loop resolves on its next pass (one suspension
   and resumption of the call's task, as every handler that waits for a batch has);
3. echo, `--answer thread`: the future is resolved from a second thread, once per group of waiting calls
   (the loop woken from another thread, as ortserve's instance threads answer a batch);
4. ortserve (`--workers 2`) serving `passthrough`: the MLP's input and output ([B, 256] -> its first 10
   columns), so ONNX Runtime costs next to nothing and what remains is ortserve's whole request path
   (conversion, validation, batching with the 1 ms adaptive delay, the instance thread, the response);
5. ortserve serving the MLP quantised to int8 (exporters/quantize.py, dynamic; gated against FP32);
6. ortserve serving the MLP in FP32 (bench/models.py's `mlp_delay1ms`, issue 15's model);
7. ortserve serving `passthrough_cnn`: the CNN's input and output ([B, 3, 32, 32] -> 10 values), a 12 KB
   request with next to no compute, so the CNN's request path priced alone;
8. ortserve serving the CNN in FP32 (`cnn_delay1ms`).
The echo rungs answer the MLP's request only; the CNN rungs compare with the MLP-shaped ones.
CPU per request is every thread of the server's processes (/proc) over the measured requests. Prints each
round, then medians and each rung's ratio to rung 1. Needs bench/setup_perf_analyzer.sh.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import profile_breakdown  # noqa: E402
from profile_breakdown import OUT, Measured, Server, load_average, measure, start_echo, start_ortserve  # noqa: E402
from run_batching import stop  # noqa: E402

from exporters import quantize  # noqa: E402
from exporters.export import ExportSpec, export_torch  # noqa: E402

CONFIG = "dynamic_batching { max_queue_delay_microseconds: 1000 }"
INT8 = "mlp_delay1ms_int8"


class Passthrough(torch.nn.Module):
    """The MLP's signature with almost no compute: the first 10 of the 256 input columns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :10] * 1.0


class PassthroughCNN(torch.nn.Module):
    """The CNN's signature with almost no compute: the first 10 values of the first row of the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :10] * 1.0


def build(repo: Path) -> None:
    """bench/out/ladder_repo: the passthroughs, the FP32 MLP and CNN (copied from bench/out/repo), the MLP in int8."""
    for name in ("mlp_delay1ms", "cnn_delay1ms"):
        if not (OUT / "repo" / name).exists():
            raise SystemExit("run `python bench/models.py` first")
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for name in ("mlp_delay1ms", "cnn_delay1ms"):
        shutil.copytree(OUT / "repo" / name, repo / name)
    spec = ExportSpec(["INPUT"], ["OUTPUT"], max_batch_size=64, extra_config=CONFIG)
    export_torch(Passthrough().eval(), (torch.zeros(2, 256),), spec, repo, "passthrough")
    export_torch(PassthroughCNN().eval(), (torch.zeros(2, 3, 32, 32),), spec, repo, "passthrough_cnn")
    held_out = quantize.HeldOut({"INPUT": np.random.default_rng(0).standard_normal((1024, 256), dtype=np.float32)})
    quantize.quantize_model_dir(repo / "mlp_delay1ms", "int8-dynamic", held_out, name=INT8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=12000, help="per measurement at concurrency 64")
    parser.add_argument("--requests-c1", type=int, default=2000)
    args = parser.parse_args()
    repo = OUT / "ladder_repo"
    build(repo)
    print(f"load average before: {load_average()}", flush=True)
    rungs: dict[str, tuple[Server, str]] = {}
    try:
        for answer in ("now", "later", "thread"):
            rungs[f"echo, answer {answer}"] = (start_echo(answer), "mlp")
        ortserve = start_ortserve(repo, 2, OUT / "ladder_port")
        for label, model in (("ortserve, passthrough", "passthrough"), ("ortserve, MLP int8", INT8),
                             ("ortserve, MLP FP32", "mlp_delay1ms"), ("ortserve, CNN-shaped passthrough",
                             "passthrough_cnn"), ("ortserve, CNN FP32", "cnn_delay1ms")):
            rungs[label] = (ortserve, model)
        names = profile_breakdown.python_thread_names(ortserve.pids)
        results: dict[tuple[str, int], list[Measured]] = {}
        for concurrency, requests in ((64, args.requests), (1, args.requests_c1)):
            for server, model in rungs.values():
                profile_breakdown.MODEL = model
                measure(server, concurrency, max(200, requests // 10), names)  # warm-up
            for round_index in range(args.rounds):
                order = list(rungs.items())
                order = order[round_index % len(order):] + order[: round_index % len(order)]
                for label, (server, model) in order:
                    profile_breakdown.MODEL = model  # what perf_analyzer asks for and whose statistics count
                    result = measure(server, concurrency, requests, names)
                    results.setdefault((label, concurrency), []).append(result)
                    print(f"c={concurrency} round {round_index + 1} {label}: {result.rate:,.0f} infer/s, "
                          f"{result.cpu_us:.0f} us CPU/request, p50 {result.p50_ms:.2f} ms, batch {result.batch:.1f}",
                          flush=True)
    finally:
        for server in {id(s): s for s, _ in rungs.values()}.values():
            stop(server.process)
    print(f"\nload average after: {load_average()}\n")
    base = list(rungs)[0]
    base_rate = statistics.median(r.rate for r in results[(base, 64)])
    base_cpu = statistics.median(r.cpu_us for r in results[(base, 64)])
    base_p50 = statistics.median(r.p50_ms for r in results[(base, 1)])
    print("| rung | c=64 infer/s | of rung 1 | CPU us/request | x rung 1 | c=64 batch | c=1 p50 ms | x rung 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in rungs:
        rate = statistics.median(r.rate for r in results[(label, 64)])
        cpu = statistics.median(r.cpu_us for r in results[(label, 64)])
        batch = statistics.median(r.batch for r in results[(label, 64)])
        p50 = statistics.median(r.p50_ms for r in results[(label, 1)])
        print(f"| {label} | {rate:,.0f} | {rate / base_rate:.0%} | {cpu:.0f} | {cpu / base_cpu:.2f} | "
              f"{batch:.1f} | {p50:.3f} | {p50 / base_p50:.2f} |")


if __name__ == "__main__":
    main()
