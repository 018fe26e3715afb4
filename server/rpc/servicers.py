"""Thin gRPC handlers for inference.GRPCInferenceService: convert, await the data plane, convert back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from server.core.errors import UnsupportedError
from server.core.types import InferRequest
from server.rpc import converters, fast_infer, status
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.pb import grpc_service_pb2_grpc as pb_grpc
from server.rpc.peers import PEER_HEADER
from server.service.dataplane import DataPlane

logger = logging.getLogger(__name__)


def _unsupported(feature: str) -> Any:
    """A handler for an extension this server does not offer: UNIMPLEMENTED, with what is missing."""

    @status.unary
    async def handler(self: Any, request: object, context: grpc.aio.ServicerContext) -> object:
        raise UnsupportedError(f"{feature} is not supported by this server")

    return handler


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol with Triton's extensions, over the data plane.

    Args:
        plane: The data plane that serves every call.
    """

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    # Triton's extensions that ortserve does not offer.
    SystemSharedMemoryStatus = _unsupported("system shared memory")
    SystemSharedMemoryRegister = _unsupported("system shared memory")
    SystemSharedMemoryUnregister = _unsupported("system shared memory")
    CudaSharedMemoryStatus = _unsupported("CUDA shared memory")
    CudaSharedMemoryRegister = _unsupported("CUDA shared memory")
    CudaSharedMemoryUnregister = _unsupported("CUDA shared memory")
    TraceSetting = _unsupported("tracing")
    LogSettings = _unsupported("changing log settings at run time")

    @status.unary
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live())

    @status.unary
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready())

    @status.unary
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        if self._plane.worker_index is not None:
            # Says which worker process answered (diagnostics, and tests of --workers).
            await context.send_initial_metadata((("ortserve-worker", str(self._plane.worker_index)),))
        return converters.server_metadata_to_pb(self._plane.metadata())

    @status.unary
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._plane.model_ready(request.name, request.version))

    @status.unary
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return converters.model_metadata_to_pb(self._plane.model_metadata(request.name, request.version))

    @status.unary
    async def ModelInfer(  # type: ignore[override]  # may answer bytes: its serializer passes them through
        self, request: pb.ModelInferRequest | InferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse | bytes:
        # The registered deserializer already made the common request an InferRequest (fast_infer.py).
        infer_request = request if isinstance(request, InferRequest) else converters.infer_request_from_pb(request)
        response = await self._plane.infer(infer_request, context.time_remaining())
        encoded = fast_infer.response_to_bytes(response)
        return encoded if encoded is not None else converters.infer_response_to_pb(response)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Responses in request order; requests run concurrently; generation models stream deltas.

        Errors travel in `error_message` and the stream stays open, unless the client
        sent the `triton_grpc_error: true` header, which closes the stream with a status.
        """
        grpc_errors = any(k == "triton_grpc_error" and v == "true" for k, v in context.invocation_metadata() or ())
        # One queue per request, in arrival order; each holds that request's responses, then None.
        order: asyncio.Queue[asyncio.Queue[Any] | None] = asyncio.Queue(maxsize=256)
        tasks: set[asyncio.Task[None]] = set()

        async def handle(request: pb.ModelInferRequest, out: asyncio.Queue[Any]) -> None:
            try:
                status.check_parsed(request)
                infer_request = converters.infer_request_from_pb(request)
                async for response in self._plane.infer_decoupled(infer_request, context.time_remaining()):
                    await out.put(pb.ModelStreamInferResponse(infer_response=converters.infer_response_to_pb(response)))
            except Exception as exc:
                code, message = status.status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    logger.error("ModelStreamInfer request failed", exc_info=exc)
                await out.put((code, message) if grpc_errors else pb.ModelStreamInferResponse(error_message=message))
            finally:
                await out.put(None)

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    self._plane.check_accepting()
                    out: asyncio.Queue[Any] = asyncio.Queue()
                    task = asyncio.ensure_future(handle(request, out))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    await order.put(out)
            finally:
                await order.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (out := await order.get()) is not None:
                while (item := await out.get()) is not None:
                    if isinstance(item, tuple):
                        await context.abort(item[0], item[1])
                    yield item
            if reader.done() and reader.exception() is not None:
                code, message = status.status_for(reader.exception())  # type: ignore[arg-type]
                await context.abort(code, message)
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @status.unary
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(self._plane.model_config(request.name, request.version))
        return response

    @status.unary
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        stats = await self._plane.statistics(request.name, request.version, local_only=_from_peer(context))
        return converters.statistics_to_pb(stats)

    @status.unary
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return converters.repository_index_to_pb(self._plane.repository_index(ready_only=request.ready))

    @status.unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        override = converters.config_override_from_pb(request.parameters)
        await self._plane.load(request.model_name, override, local_only=_from_peer(context))
        return pb.RepositoryModelLoadResponse()

    @status.unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._plane.unload(request.model_name, local_only=_from_peer(context))
        return pb.RepositoryModelUnloadResponse()


def _from_peer(context: grpc.aio.ServicerContext) -> bool:
    """A sibling worker's call: the peer header, on the private Unix socket only.

    On the public port the header means nothing: a client could otherwise act on one
    worker alone and leave the workers disagreeing.
    """
    if not (context.peer() or "").startswith("unix:"):
        return False
    return any(key == PEER_HEADER for key, _ in context.invocation_metadata() or ())
