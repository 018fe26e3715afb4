"""The transport limit: a bare grpc.aio server that answers ModelInfer with a canned MLP-sized response.

It also answers the metadata calls perf_analyzer makes, for a model named "mlp" with
input INPUT FP32 [-1, 256] and output OUTPUT FP32 [-1, 10]. It parses each request
(as any server must) and returns the same pre-serialised response bytes: no model,
no batching, nothing but gRPC and protobuf.

    python bench/echo_server.py --port 8101 [--workers 2] [--uvloop] [--answer now|later|thread]

`--answer` says how ModelInfer's handler answers, to price what a real server's handler adds
(bench/run_ladder.py): `now` returns at once (the transport alone); `later` awaits a future the loop
resolves on its next pass (one suspension and resumption of the call's task, as a handler that waits
for a batch has); `thread` hands the call to a second thread, which resolves every call it finds
waiting with one `call_soon_threadsafe` (the loop woken from another thread once per group, as
ortserve's instance threads answer a batch).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import threading

import grpc

from server.rpc.pb import grpc_service_pb2 as pb
from server.schema import model_config_pb2 as mc

SERVICE = "inference.GRPCInferenceService"


def _canned() -> dict[str, bytes]:
    config = mc.ModelConfig(name="mlp", platform="onnxruntime_onnx", max_batch_size=64)
    config.input.add(name="INPUT", data_type=mc.TYPE_FP32, dims=[256])
    config.output.add(name="OUTPUT", data_type=mc.TYPE_FP32, dims=[10])
    metadata = pb.ModelMetadataResponse(name="mlp", versions=["1"], platform="onnxruntime_onnx")
    metadata.inputs.add(name="INPUT", datatype="FP32", shape=[-1, 256])
    metadata.outputs.add(name="OUTPUT", datatype="FP32", shape=[-1, 10])
    infer = pb.ModelInferResponse(model_name="mlp", model_version="1")
    infer.outputs.add(name="OUTPUT", datatype="FP32", shape=[1, 10])
    infer.raw_output_contents.append(bytes(40))
    return {
        "ServerLive": pb.ServerLiveResponse(live=True).SerializeToString(),
        "ServerReady": pb.ServerReadyResponse(ready=True).SerializeToString(),
        "ModelReady": pb.ModelReadyResponse(ready=True).SerializeToString(),
        "ServerMetadata": pb.ServerMetadataResponse(name="echo", version="0").SerializeToString(),
        "ModelMetadata": metadata.SerializeToString(),
        "ModelConfig": pb.ModelConfigResponse(config=config).SerializeToString(),
        "ModelInfer": infer.SerializeToString(),
    }


class _Answerer:
    """A thread that resolves the futures handed to it: every one waiting, with one wake-up of the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: queue.SimpleQueue[tuple[asyncio.Future[bytes], bytes]] = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, future: asyncio.Future[bytes], response: bytes) -> None:
        self._waiting.put((future, response))

    def _run(self) -> None:
        while True:
            group = [self._waiting.get()]
            while not self._waiting.empty():
                group.append(self._waiting.get())
            self._loop.call_soon_threadsafe(_resolve, group)


def _resolve(group: list[tuple[asyncio.Future[bytes], bytes]]) -> None:
    for future, response in group:
        if not future.done():
            future.set_result(response)


def _handlers(answer: str, loop: asyncio.AbstractEventLoop) -> grpc.GenericRpcHandler:
    canned = _canned()
    answerer = _Answerer(loop) if answer == "thread" else None
    handlers = {}
    for name, response in canned.items():
        request_class = getattr(pb, f"{name}Request")

        async def handle(request: object, context: object, response: bytes = response) -> bytes:
            return response

        async def handle_later(request: object, context: object, response: bytes = response) -> bytes:
            future: asyncio.Future[bytes] = loop.create_future()
            if answerer is not None:
                answerer.submit(future, response)
            else:
                loop.call_soon(future.set_result, response)
            return await future

        chosen = handle_later if name == "ModelInfer" and answer != "now" else handle
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            chosen, request_deserializer=request_class.FromString, response_serializer=lambda b: b
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def _serve(port: int, answer: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((_handlers(answer, asyncio.get_running_loop()),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _run(port: int, use_uvloop: bool, answer: str) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(_serve(port, answer))
    else:
        asyncio.run(_serve(port, answer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--answer", choices=("now", "later", "thread"), default="now")
    args = parser.parse_args()
    workers = [
        multiprocessing.Process(target=_run, args=(args.port, args.uvloop, args.answer)) for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    print(f"echo server on 127.0.0.1:{args.port}, {args.workers} process(es), pid {os.getpid()}", flush=True)
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
