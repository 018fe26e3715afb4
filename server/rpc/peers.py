"""The data plane's calls to sibling workers (service.control.Peers), over gRPC on their private Unix sockets."""

from __future__ import annotations

import asyncio
import logging

import grpc
import orjson
from google.protobuf import json_format

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
from server.rpc import converters
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.pb import grpc_service_pb2_grpc as pb_grpc
from server.rpc.registration import PEER_METRICS_METHOD
from server.schema import model_config_pb2 as mc
from server.service.metrics import Family, families_from_json
from server.service.statistics import VersionStatistics

logger = logging.getLogger(__name__)

# Marks a call from a sibling worker (statistics, load, unload): answer or act locally only.
# Honoured only on the private Unix socket (servicers._from_peer), never on the public port.
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
PEER_STATISTICS_TIMEOUT_S = 5.0


class GrpcPeers:
    """Sibling workers reached through GRPCInferenceService stubs, one channel kept per sibling."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: set[grpc.aio.Channel] = set()
        self._closing: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Closes the channels to the siblings."""
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()
        self._channels.clear()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return channel

    def _stub(self, address: str) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(self._channel(address))

    def _forget(self, address: str) -> None:
        """Replaces the channel to a sibling that did not answer; the next call opens a new one.

        A channel whose connection failed waits out a reconnect backoff and fails calls
        fast meanwhile; a restarted sibling must be reachable at once (a load must not skip it).
        Calls still running on the old channel (another RPC's) are let finish before it closes.
        """
        channel = self._channels.pop(address, None)
        if channel is not None:
            self._retired.add(channel)
            task = asyncio.get_running_loop().create_task(channel.close(grace=PEER_CONTROL_TIMEOUT_S))
            self._closing.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._closing.discard)
            task.add_done_callback(lambda _: self._retired.discard(channel))

    async def statistics(self, address: str, name: str, version: str) -> list[VersionStatistics] | None:
        """The sibling's own statistics; None (and a warning) when it did not answer."""
        request = pb.ModelStatisticsRequest(name=name, version=version)
        try:
            reply = await self._stub(address).ModelStatistics(
                request, metadata=((PEER_HEADER, "1"),), timeout=PEER_STATISTICS_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning("worker at %s did not answer ModelStatistics: %s", address, exc.code().name)
            self._forget(address)
            return None
        return converters.statistics_from_pb(reply)

    async def metrics(self, address: str) -> list[Family] | None:
        """The sibling's own metric families (the private Peer/Metrics call); None when it did not answer."""
        call = self._channel(address).unary_unary(PEER_METRICS_METHOD)
        try:
            reply = await call(b"", timeout=PEER_STATISTICS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            logger.warning("worker at %s did not answer for metrics: %s", address, exc.code().name)
            self._forget(address)
            return None
        return families_from_json(orjson.loads(reply))

    async def load(self, address: str, name: str, config: mc.ModelConfig | None) -> bool:
        """RepositoryModelLoad on one sibling, the override as the JSON `config` parameter; False when it is down."""
        request = pb.RepositoryModelLoadRequest(model_name=name)
        if config is not None:
            request.parameters["config"].string_param = json_format.MessageToJson(config)
        return await self._control(address, "RepositoryModelLoad", request)

    async def unload(self, address: str, name: str) -> bool:
        """RepositoryModelUnload on one sibling; False when it is down."""
        return await self._control(address, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name))

    async def _control(self, address: str, method: str, request: object) -> bool:
        """Applies a load or unload on one sibling; False when it is not serving (dead or restarting).

        A sibling that is down loads the recorded model set when it comes back, so it
        needs no retry here.

        Raises:
            ServerError: the sibling refused the operation (its status code, its message).
        """
        try:
            await getattr(self._stub(address), method)(
                request, metadata=((PEER_HEADER, "1"),), timeout=PEER_CONTROL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            # Load and unload never answer UNAVAILABLE for a model: this is a sibling that is
            # down, restarting or shutting down.
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._forget(address)
                logger.warning("worker at %s is not serving; it loads the recorded models when it restarts", address)
                return False
            error = _ERROR_BY_CODE.get(exc.code())
            if error is None:
                raise RuntimeError(f"worker at {address}: {method} ended {exc.code().name}: {exc.details()}") from exc
            raise error(exc.details()) from exc
        return True
