"""Registers every gRPC service with deserializers that cannot make gRPC answer UNKNOWN.

grpc-python answers UNKNOWN when a request body fails to parse. Our deserializer
returns a MalformedRequest marker instead, and the handlers' status wrapper turns
it into INVALID_ARGUMENT, so every failure has a meaningful code. Servicers we did
not write (health, reflection) are wrapped so the marker never reaches them.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server.core.errors import ServerError
from server.logs import access, new_request_id, request_id
from server.rpc import fast_infer, status
from server.rpc.auth import Metadata, MethodGate, refuse
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.status import MalformedRequest
from server.service.auth import Authenticator
from server.service.metrics import RequestCounter

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
GENERATION_SERVICE = gen_pb.DESCRIPTOR.services_by_name["TextGeneration"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
PEER_SERVICE = "ortserve.peer.Peer"  # private to sibling workers; see add_peer_metrics_service
PEER_METRICS_METHOD = f"/{PEER_SERVICE}/Metrics"

# grpc.aio keeps one pending "next call" future per registered method, plus one for all
# the others, and each incoming call costs an asyncio.wait over the whole set (with every
# method registered, about 20 futures: 15% of the event loop's time under a profiler at
# concurrency 64; unprofiled, about 4% more requests/s once trimmed). So only the calls that
# carry traffic are registered; the rest, and the health and reflection services, are
# served through the generic handler, which resolves them by name.
HOT_METHODS = frozenset({
    "inference.GRPCInferenceService/ModelInfer",
    "inference.GRPCInferenceService/ModelStreamInfer",
    "ortserve.v1.TextGeneration/Generate",
})


def _safe_deserializer(message_class: Any) -> Callable[[bytes], object]:
    def deserialize(data: bytes) -> object:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(message_class.__name__, str(exc) or "decode error")

    return deserialize


def add_inference_service(
    servicer: object, server: grpc.aio.Server, observer: CallObserver | None = None,
    authenticator: Authenticator | None = None,
) -> None:
    """Adds every RPC of inference.GRPCInferenceService, implemented by `servicer`'s methods.

    ModelInfer reads and writes its common messages without protobuf (fast_infer.py): its handler
    receives either the core InferRequest or a ModelInferRequest, and may answer with bytes.
    """
    codecs = {"ModelInfer": model_infer_codec()}
    add_service(SERVICE, pb, servicer, server, observer=observer, authenticator=authenticator, codecs=codecs)


def model_infer_codec() -> tuple[Callable[[bytes], object], Callable[[Any], bytes]]:
    """ModelInfer's (deserializer, serializer): the fast path's, falling back to protobuf's safe parse."""
    return fast_infer.request_deserializer(_safe_deserializer(pb.ModelInferRequest)), fast_infer.serialize_response


def add_generation_service(
    servicer: object, server: grpc.aio.Server, observer: CallObserver | None = None,
    authenticator: Authenticator | None = None,
) -> None:
    """Adds ortserve.v1.TextGeneration."""
    add_service(GENERATION_SERVICE, gen_pb, servicer, server, observer=observer, authenticator=authenticator)


def add_health_service(
    servicer: object, server: grpc.aio.Server, observer: CallObserver | None = None,
    authenticator: Authenticator | None = None,
) -> None:
    """Adds grpc.health.v1.Health (Check and Watch) around the stock servicer."""
    add_service(HEALTH_SERVICE, health_pb2, servicer, server, guarded=True, observer=observer,
                authenticator=authenticator)


def add_reflection_service(
    servicer: object, server: grpc.aio.Server, authenticator: Authenticator | None = None
) -> None:
    """Adds grpc.reflection.v1alpha.ServerReflection around the stock servicer (not counted: tooling only)."""
    add_service(REFLECTION_SERVICE, reflection_pb2, servicer, server, guarded=True, authenticator=authenticator)


def add_peer_metrics_service(local_metrics: Callable[[], bytes], server: grpc.aio.Server) -> None:
    """The private call a sibling worker makes for this worker's own metric families (JSON bytes).

    Raw bytes both ways (no message type of its own); answered on the private Unix socket
    only: on the public port it does not exist (UNIMPLEMENTED, as any unknown method).
    """

    async def metrics(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not (context.peer() or "").startswith("unix:"):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return local_metrics()

    handler = grpc.unary_unary_rpc_method_handler(metrics)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PEER_SERVICE, {"Metrics": handler}),))


def add_service(
    service: Any, module: Any, servicer: object, server: grpc.aio.Server, guarded: bool = False,
    observer: CallObserver | None = None, authenticator: Authenticator | None = None,
    codecs: Mapping[str, tuple[Callable[[bytes], object], Callable[[Any], bytes]]] | None = None,
) -> None:
    """Registers `servicer`'s methods for every RPC of `service` (messages from `module`).

    Args:
        guarded: Wrap each method with status.guard (for methods that do not call
            status.check_parsed themselves: servicers we did not write, served by the generic handler only).
        observer: Counts each call by method and final status code (the metrics' gRPC requests), sets its
            request id for the log, and writes the access log.
        authenticator: With --auth-config: each method runs only for callers allowed its role (rpc/auth.py),
            inside the observer, so refusals are counted and logged too.
        codecs: A method's own (deserializer, serializer), in place of its messages' protobuf ones.
    """
    handlers = {}
    for method in service.methods:
        request_class = getattr(module, method.input_type.name)
        behaviour = getattr(servicer, method.name)
        if guarded:
            behaviour = status.guard(behaviour, method.client_streaming, method.server_streaming)
        path = f"/{service.full_name}/{method.name}"
        gate = MethodGate(authenticator, path) if authenticator is not None else None
        if observer is not None or gate is not None:
            behaviour = _wrapped(behaviour, path, observer, gate)
        deserializer, serializer = (codecs or {}).get(method.name) or (
            _safe_deserializer(request_class), getattr(module, method.output_type.name).SerializeToString
        )
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behaviour, request_deserializer=deserializer, response_serializer=serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    hot = {name: h for name, h in handlers.items() if f"{service.full_name}/{name}" in HOT_METHODS}
    if hot:
        server.add_registered_method_handlers(service.full_name, hot)


@dataclass(frozen=True)
class CallObserver:
    """What every call reports: its count by status (metrics), and an access-log line when asked."""

    counter: RequestCounter
    access_log: bool = False


def _begin(request: Any, context: grpc.aio.ServicerContext, metadata: Metadata | None) -> str:
    """Sets the call's request id: the request's `id`, else the `x-request-id` metadata, else a new one
    (then sent back in the trailing metadata). Returns the model the call names, for the access log."""
    given = getattr(request, "id", "") or ""
    if not isinstance(given, str) or not given:
        given = ""
        for key, value in metadata if metadata is not None else _metadata(context):
            if key == "x-request-id":
                given = value if isinstance(value, str) else value.decode("latin-1")
                break
        rid = new_request_id(given)
        context.set_trailing_metadata((("x-request-id", rid),))
    else:
        rid = new_request_id(given)
    request_id.set(rid)
    # ModelInferRequest.model_name, the metadata/config/statistics requests' name, GenerateRequest.model.
    for field in ("model_name", "name", "model"):
        model = getattr(request, field, None)
        if isinstance(model, str):
            return model
    return ""


def _metadata(context: grpc.aio.ServicerContext) -> Metadata:
    # grpc.aio converts the call's metadata to Python on every invocation_metadata(): read it once per call.
    return tuple(context.invocation_metadata() or ())


def _end(path: str, observer: CallObserver, context: grpc.aio.ServicerContext, outcome: str, model: str,
         started: float) -> None:
    code = context.code()
    name = str(code.name) if isinstance(code, grpc.StatusCode) else (outcome if code is None else str(code))
    observer.counter.count(path, name)
    if observer.access_log:
        access("gRPC", path, model, name, started)


def _wrapped(
    behaviour: Callable[..., Any], path: str, observer: CallObserver | None, gate: MethodGate | None
) -> Callable[..., Any]:
    """`behaviour` in one wrapper per call that does what the server asks of every call:

    - observer: counted (CallObserver) by its final status: the code it set or aborted with, OK when it
      set none, CANCELLED when the call was cancelled, UNKNOWN for an escaped exception; its request id set;
    - gate: run only for callers the auth config allows (rpc/auth.py), refused otherwise; inside the
      counting, so refusals are counted and logged too.

    One wrapper rather than one each: a coroutine frame and a conversion of the metadata less per call.
    """

    def admitted(request: Any, context: grpc.aio.ServicerContext) -> tuple[str, ServerError | None]:
        metadata = _metadata(context) if gate is not None else None
        model = _begin(request, context, metadata) if observer is not None else ""
        return model, (gate.refusal(metadata, context) if gate is not None and metadata is not None else None)

    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, outcome, model = time.perf_counter(), "UNKNOWN", ""
            try:
                model, refusal = admitted(request, context)
                if refusal is not None:
                    await refuse(context, refusal)  # raises (grpc's abort)
                    return
                async for item in behaviour(request, context):
                    yield item
                outcome = "OK"
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            finally:
                if observer is not None:
                    _end(path, observer, context, outcome, model, started)

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, outcome, model = time.perf_counter(), "UNKNOWN", ""
        try:
            model, refusal = admitted(request, context)
            if refusal is not None:
                await refuse(context, refusal)  # raises (grpc's abort)
                return None
            result = await behaviour(request, context)
            outcome = "OK"
            return result
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        finally:
            if observer is not None:
                _end(path, observer, context, outcome, model, started)

    return call
