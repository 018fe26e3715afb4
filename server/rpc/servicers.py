"""Thin gRPC handlers for inference.GRPCInferenceService: convert, await the core, convert back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from server import workers
from server.core.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    PermissionDeniedError,
    QueueFullError,
    ServerError,
    ServerUnavailableError,
    UnsupportedError,
)
from server.core.generation import request_args
from server.repository.registry import ModelRegistry
from server.rpc import converters, status
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.pb import grpc_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVER_NAME = "ortserve"
# Marks a call from a sibling worker (statistics, load, unload): answer or act locally only.
# Honoured only on the private Unix socket (see _from_peer), never on the public port.
PEER_HEADER = "ortserve-peer-local"
# A peer's status code back into the domain error that carries it, so a client sees the
# code the failing worker gave; anything else becomes INTERNAL.
_ERROR_BY_CODE: dict[grpc.StatusCode, type[ServerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFullError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}
# A load can take long (big models, warm-up); a peer that has not answered by then is stuck.
PEER_CONTROL_TIMEOUT_S = 600.0
# Only what is true of this server: perf_analyzer reads ModelStatistics only when
# "statistics" is listed, and clients probe "classification" and "model_repository".
EXTENSIONS = ["classification", "model_configuration", "model_repository", "statistics", "parameters"]


class ServerState:
    """Whether the server is ready and whether it still takes new work."""

    def __init__(self, strict_readiness: bool) -> None:
        self.started = False
        self.draining = False
        self.strict_readiness = strict_readiness


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol with Triton's extensions, over a ModelRegistry.

    Args:
        registry: The loaded models.
        state: Server readiness, shared with the app.
        version: Server version reported in ServerMetadata.
    """

    def __init__(self, registry: ModelRegistry, state: ServerState, version: str, control_mode: str = "none") -> None:
        self._registry = registry
        self._state = state
        self._version = version
        self._control_mode = control_mode
        # Private addresses of sibling worker processes (see server/workers.py).
        self.peers: list[str] = []
        self.worker_index: int | None = None
        # The supervisor's shared directory: the model-control lock and the model set (workers.py).
        self.peer_dir: Path | None = None
        self._peer_channels: dict[str, grpc.aio.Channel] = {}
        self._retired_channels: set[grpc.aio.Channel] = set()
        self._closing: set[asyncio.Task[None]] = set()
        # Model-control operations run to the end even when their caller leaves (every worker or none).
        self._control_tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Closes the channels to sibling workers."""
        for channel in [*self._peer_channels.values(), *self._retired_channels]:
            await channel.close()
        self._peer_channels.clear()

    def _peer_stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        """A stub for a sibling worker, over one channel kept per worker."""
        channel = self._peer_channels.get(address)
        if channel is None:
            channel = self._peer_channels[address] = grpc.aio.insecure_channel(address)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    async def _peer_statistics(self, address: str, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse | None:
        stub = self._peer_stub(address)
        try:
            return await stub.ModelStatistics(request, metadata=((PEER_HEADER, "1"),), timeout=5)
        except grpc.aio.AioRpcError as exc:
            logger.warning("worker at %s did not answer ModelStatistics: %s", address, exc.code().name)
            self._forget_peer(address)
            return None

    def _forget_peer(self, address: str) -> None:
        """Replaces the channel to a sibling that did not answer; the next call opens a new one.

        A channel whose connection failed waits out a reconnect backoff and fails calls
        fast meanwhile; a restarted sibling must be reachable at once (a load must not skip it).
        Calls still running on the old channel (another RPC's) are let finish before it closes.
        """
        channel = self._peer_channels.pop(address, None)
        if channel is not None:
            self._retired_channels.add(channel)
            task = asyncio.get_running_loop().create_task(channel.close(grace=PEER_CONTROL_TIMEOUT_S))
            self._closing.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._closing.discard)
            task.add_done_callback(lambda _: self._retired_channels.discard(channel))

    def _check_accepting(self) -> None:
        if self._state.draining:
            raise ServerUnavailableError("server is shutting down")

    def server_ready(self) -> bool:
        """Ready: started, not draining, and (strict) every known model ready."""
        if not self._state.started or self._state.draining:
            return False
        if self._state.strict_readiness:
            # Models unloaded on purpose (explicit mode) do not make the server unready.
            return all(self._registry.is_ready(e.name) or e.reason == "unloaded" for e in self._registry.entries())
        return True

    @status.unary
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @status.unary
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.server_ready())

    @status.unary
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        if self.worker_index is not None:
            # Says which worker process answered (diagnostics, and tests of --workers).
            await context.send_initial_metadata((("ortserve-worker", str(self.worker_index)),))
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    @status.unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        ready = not self._state.draining and self._registry.is_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @status.unary
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        self._registry.get(request.name, request.version)  # refuses empty, unknown, unready
        models = self._registry.models(request.name, request.version)
        return converters.model_metadata_to_pb(request.name, models)

    @status.unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        self._check_accepting()
        return await self._infer(request, context.time_remaining())

    async def _infer(self, request: pb.ModelInferRequest, deadline_s: float | None = None) -> pb.ModelInferResponse:
        model = self._registry.get(request.model_name, request.model_version)
        if getattr(model, "generator", None) is not None:
            return await self._generation_unary(model, request, deadline_s)
        infer_request = converters.infer_request_from_pb(request)
        response = await model.infer(infer_request, deadline_s)
        return converters.infer_response_to_pb(response)

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
                model = self._registry.get(request.model_name, request.model_version)
                if getattr(model, "generator", None) is not None:
                    async for response in self._generation_responses(model, request, context.time_remaining()):
                        await out.put(pb.ModelStreamInferResponse(infer_response=response))
                else:
                    response = await self._infer(request)
                    response.parameters["triton_final_response"].bool_param = True
                    await out.put(pb.ModelStreamInferResponse(infer_response=response))
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
                    self._check_accepting()
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

    async def _generation_unary(
        self, model: Any, request: pb.ModelInferRequest, deadline_s: float | None
    ) -> pb.ModelInferResponse:
        """Unary ModelInfer on a generation model: the whole completion in one `text_output`."""
        started = time.perf_counter_ns()
        ok = False
        try:
            args = request_args(converters.infer_request_from_pb(request), model.validator.validate, default_stream=False)
            pieces = [] if args.exclude_input else [args.prompt.decode("utf-8", "replace")]
            async for chunk in model.generator.generate(args.prompt, args.params, deadline_s):
                pieces.append(chunk.text)
            ok = True
        finally:
            model.record_generation(ok, time.perf_counter_ns() - started)
        response = converters.text_response_to_pb(model, request.id, "".join(pieces), final=True)
        del response.parameters["triton_final_response"]  # a unary answer is not one of a series
        return response

    async def _generation_responses(
        self, model: Any, request: pb.ModelInferRequest, deadline_s: float | None = None
    ) -> AsyncIterator[pb.ModelInferResponse]:
        """Triton's decoupled text-generation responses: `text_output` deltas, `triton_final_response` on each."""
        started = time.perf_counter_ns()
        ok = False
        try:
            async for response in self._generation_stream(model, request, deadline_s):
                yield response
            ok = True
        finally:
            model.record_generation(ok, time.perf_counter_ns() - started)

    async def _generation_stream(
        self, model: Any, request: pb.ModelInferRequest, deadline_s: float | None
    ) -> AsyncIterator[pb.ModelInferResponse]:
        args = request_args(converters.infer_request_from_pb(request), model.validator.validate, default_stream=True)
        empty_final = args.empty_final
        pieces: list[str] = []
        async for chunk in model.generator.generate(args.prompt, args.params, deadline_s):
            last = chunk.finish_reason is not None
            if not args.stream:
                pieces.append(chunk.text)
                if not last:
                    continue
                text = ("" if args.exclude_input else args.prompt.decode("utf-8", "replace")) + "".join(pieces)
            else:
                text = chunk.text
            if last and empty_final and not text:
                break
            yield converters.text_response_to_pb(model, request.id, text, final=last and not empty_final)
        if empty_final:
            yield converters.text_response_to_pb(model, request.id, None, final=True)

    @status.unary
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        model = self._registry.get(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        return response

    @status.unary
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for model in self._registry.models(request.name, request.version):
            converters.model_statistics_to_pb(model, response.model_stats.add())
        if self.peers and not _from_peer(context):
            replies = await asyncio.gather(*(self._peer_statistics(a, request) for a in self.peers))
            for reply in replies:
                if reply is not None:
                    converters.merge_statistics(response, reply)
        return response

    @status.unary
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return converters.repository_index_to_pb(self._registry.index(ready_only=request.ready))

    def _check_explicit(self, action: str) -> None:
        if self._control_mode != "explicit":
            raise PermissionDeniedError(
                f"model {action} through the API needs --model-control-mode explicit (this server runs "
                f"'{self._control_mode}')"
            )

    async def _on_peer(self, address: str, method: str, request: object) -> bool:
        """Applies a load or unload on one sibling; False when it is not serving (dead or restarting).

        A sibling that is down loads the recorded model set when it comes back, so it
        needs no retry here.

        Raises:
            ServerError: the sibling refused the operation (its status code, its message).
        """
        try:
            await getattr(self._peer_stub(address), method)(
                request, metadata=((PEER_HEADER, "1"),), timeout=PEER_CONTROL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            # Load and unload never answer UNAVAILABLE for a model: this is a sibling that is
            # down, restarting or shutting down.
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._forget_peer(address)
                logger.warning("worker at %s is not serving; it loads the recorded models when it restarts", address)
                return False
            error = _ERROR_BY_CODE.get(exc.code())
            if error is None:
                raise RuntimeError(f"worker at {address}: {method} ended {exc.code().name}: {exc.details()}") from exc
            raise error(exc.details()) from exc
        return True

    async def _everywhere(self, local: Callable[[], Any], method: str, request: object) -> list[BaseException | bool]:
        """Runs an operation here and on every sibling at once; per worker, True, False (down) or the error."""

        async def here() -> bool:
            await local()
            return True

        calls = [here(), *(self._on_peer(a, method, request) for a in self.peers)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    async def _control(self, operation: Callable[[], Any]) -> None:
        """Runs a model-control operation under the workers' exclusive lock, to the end even if the caller leaves."""
        assert self.peer_dir is not None

        async def locked() -> None:
            assert self.peer_dir is not None
            fd = await workers.lock_control(self.peer_dir, exclusive=True)
            try:
                await operation()
            finally:
                workers.unlock_control(fd)

        task = asyncio.get_running_loop().create_task(locked())
        self._control_tasks.add(task)
        task.add_done_callback(_finish_control)
        task.add_done_callback(self._control_tasks.discard)
        await asyncio.shield(task)

    def _recorded_models(self) -> dict[str, bytes]:
        """The model set all workers agree on: the last recorded one, else what each loaded at start."""
        assert self.peer_dir is not None
        models = workers.read_models(self.peer_dir)
        if models is None:
            # Nothing changed since start: every worker loaded the same start-up set.
            models = {e.name: b"" for e in self._registry.entries() if e.reason != "unloaded"}
        return models

    async def _load_everywhere(self, request: pb.RepositoryModelLoadRequest, override: Any) -> None:
        """Loads on every worker; a load that succeeds on some and fails on others is rolled back."""
        assert self.peer_dir is not None
        name = request.model_name
        models = self._recorded_models()
        was_ready = self._registry.is_ready(name)
        results = await self._everywhere(lambda: self._registry.load(name, override), "RepositoryModelLoad", request)
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            models[name] = request.SerializeToString()
            workers.write_models(self.peer_dir, models)
            return
        if any(r is True for r in results):
            await self._roll_back_load(name, results, models.get(name) if was_ready else None)
        elif not was_ready:
            # Failed everywhere: a restarted worker tries the same and reports the same reason.
            models[name] = request.SerializeToString()
            workers.write_models(self.peer_dir, models)
        raise errors[0]

    async def _roll_back_load(self, name: str, results: list[BaseException | bool], previous: bytes | None) -> None:
        """Brings the workers where a load succeeded back to the state of the others.

        Args:
            previous: The load request of the version that served before (reload), or None
                (first load: unload it again).
        """
        logger.error("load of '%s' failed on some workers; rolling it back on the others", name)
        addresses = [None, *self.peers]
        for address, result in zip(addresses, results):
            if result is not True:
                continue
            try:
                if previous is None:
                    unload = pb.RepositoryModelUnloadRequest(model_name=name)
                    if address is None:
                        await self._registry.unload(name)
                    else:
                        await self._on_peer(address, "RepositoryModelUnload", unload)
                else:
                    reload = pb.RepositoryModelLoadRequest.FromString(previous) if previous else None
                    reload = reload or pb.RepositoryModelLoadRequest(model_name=name)
                    if address is None:
                        await self._registry.load(name, converters.config_override_from_pb(reload.parameters))
                    else:
                        await self._on_peer(address, "RepositoryModelLoad", reload)
            except Exception:
                logger.exception("rolling back '%s' on worker %s failed", name, address or self.worker_index)

    async def _unload_everywhere(self, request: pb.RepositoryModelUnloadRequest) -> None:
        """Unloads on every worker: success if any had it loaded, NOT_FOUND if none had."""
        assert self.peer_dir is not None
        name = request.model_name
        models = self._recorded_models()
        results = await self._everywhere(lambda: self._registry.unload(name), "RepositoryModelUnload", request)
        models.pop(name, None)
        workers.write_models(self.peer_dir, models)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ModelNotFoundError)]
        if errors:
            raise errors[0]
        if not any(r is True for r in results):
            raise next(r for r in results if isinstance(r, ModelNotFoundError))

    @status.unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._check_explicit("loading")
        override = converters.config_override_from_pb(request.parameters)
        self._registry.repository.model_dir(request.model_name)  # refuses bad names before any worker acts
        if self.peer_dir is None or _from_peer(context):
            await self._registry.load(request.model_name, override)
        else:
            await self._control(lambda: self._load_everywhere(request, override))
        return pb.RepositoryModelLoadResponse()

    @status.unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_explicit("unloading")
        if self.peer_dir is None or _from_peer(context):
            await self._registry.unload(request.model_name)
        else:
            await self._control(lambda: self._unload_everywhere(request))
        return pb.RepositoryModelUnloadResponse()


def _finish_control(task: asyncio.Task[None]) -> None:
    """Retrieves the outcome of a control task whose caller left, so it is not reported as unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("model-control operation ended with: %s", task.exception())


def _from_peer(context: grpc.aio.ServicerContext) -> bool:
    """A sibling worker's call: the peer header, on the private Unix socket only.

    On the public port the header means nothing: a client could otherwise act on one
    worker alone and leave the workers disagreeing.
    """
    if not (context.peer() or "").startswith("unix:"):
        return False
    return any(key == PEER_HEADER for key, _ in context.invocation_metadata() or ())


def _unsupported(feature: str) -> Callable[..., object]:
    @status.unary
    async def handler(self: InferenceServicer, request: object, context: grpc.aio.ServicerContext) -> object:
        raise UnsupportedError(f"{feature} is not supported by this server")

    return handler


for _rpc, _feature in [
    ("SystemSharedMemoryStatus", "system shared memory"),
    ("SystemSharedMemoryRegister", "system shared memory"),
    ("SystemSharedMemoryUnregister", "system shared memory"),
    ("CudaSharedMemoryStatus", "CUDA shared memory"),
    ("CudaSharedMemoryRegister", "CUDA shared memory"),
    ("CudaSharedMemoryUnregister", "CUDA shared memory"),
    ("TraceSetting", "tracing"),
    ("LogSettings", "changing log settings at run time"),
]:
    setattr(InferenceServicer, _rpc, _unsupported(_feature))
