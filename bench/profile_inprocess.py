"""ModelInfer's Python path in process, without gRPC: `python bench/profile_inprocess.py [--profile]`.

What our own Python costs per request with hot caches, apart from the transport: the request's bytes go
through the same deserializer, call wrapper (request id, metrics, status mapping), servicer, data plane,
model, scheduler and serializer that a gRPC call takes, driven by `--concurrency` client coroutines on
uvloop, with a stand-in for the gRPC call context. Models are bench/models.py's (`mlp_delay1ms` by
default; the script builds bench/out/repo if it is missing; `--repo bench/out/ladder_repo --model passthrough`
for a model that computes nothing, after bench/run_ladder.py built it). Prints CPU per request (the process's
user+system time over the measured requests, ONNX Runtime's runs included), requests/s and the average
batch; with `--profile`, cProfile's top functions by own time (cProfile roughly doubles the time of
small functions, so read its numbers as shares, not costs). docs/benchmarks.md has a run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from server.app import OrtServer  # noqa: E402
from server.rpc.pb import grpc_service_pb2 as pb  # noqa: E402
from server.rpc.registration import CallObserver, _wrapped, model_infer_codec  # noqa: E402
from server.rpc.servicers import InferenceServicer  # noqa: E402
from server.settings import Settings  # noqa: E402

REPO = BENCH / "out" / "repo"
METHOD = "/inference.GRPCInferenceService/ModelInfer"


class CallContext:
    """What the handlers ask of grpc.aio's ServicerContext on a successful call."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def code(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def request_bytes(model: str, shape: tuple[int, ...]) -> bytes:
    """A batch-1 request as perf_analyzer sends it (with its `triton_enable_empty_final_response` parameter)."""
    message = pb.ModelInferRequest(model_name=model)
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    message.inputs.add(name="INPUT", datatype="FP32", shape=[1, *shape])
    message.raw_input_contents.append(np.ones(shape, np.float32).tobytes())
    return message.SerializeToString()


async def run(repo: Path, model: str, requests: int, concurrency: int, profile: bool, top: int) -> None:
    settings = Settings(model_repository=repo, load_model=[model], model_control_mode="explicit", host="127.0.0.1",
                        allow_http=False, allow_metrics=False)
    server = OrtServer(settings)
    await server.registry.load_all([model])
    served = server.registry.get(model)
    servicer = InferenceServicer(server.plane)
    call = _wrapped(servicer.ModelInfer, METHOD, CallObserver(server.plane.grpc_requests), None)
    deserialize, serialize = model_infer_codec()
    shape = tuple(served.validator.signature.inputs[0].dims)
    body, context = request_bytes(model, shape), CallContext()

    async def client(count: int) -> None:
        for _ in range(count):
            serialize(await call(deserialize(body), context))

    await asyncio.gather(*(client(50) for _ in range(concurrency)))  # warm-up
    runs_before = (served.stats.inference_count, served.stats.execution_count)
    profiler = cProfile.Profile() if profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    per_client = requests // concurrency
    await asyncio.gather(*(client(per_client) for _ in range(concurrency)))
    if profiler is not None:
        profiler.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per_client * concurrency
    inferences = served.stats.inference_count - runs_before[0]
    executions = max(1, served.stats.execution_count - runs_before[1])
    print(f"{model}, {concurrency} clients, {done} requests{' (under cProfile)' if profile else ''}: "
          f"{1e6 * cpu / done:.1f} us CPU/request, {done / wall:,.0f} requests/s, "
          f"average batch {inferences / executions:.1f}")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    await server.registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="e.g. bench/out/ladder_repo for `passthrough`")
    parser.add_argument("--model", default="mlp_delay1ms")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.repo == REPO and not (REPO / args.model).exists():
        subprocess.run([sys.executable, str(BENCH / "models.py"), "--out", str(REPO)], cwd=ROOT, check=True)
    uvloop.run(run(args.repo, args.model, args.requests, args.concurrency, args.profile, args.top))


if __name__ == "__main__":
    main()
