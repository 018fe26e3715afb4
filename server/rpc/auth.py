"""Authentication on the gRPC front end: every method needs a role, checked before the servicer runs.

The credential is the `authorization: Bearer <key or token>` metadata. Calls on the workers'
private Unix socket are trusted (only sibling workers reach it, in a 0700 directory) and carry
no principal. Refusals end the call with UNAUTHENTICATED (and `www-authenticate: Bearer`),
PERMISSION_DENIED or RESOURCE_EXHAUSTED (with `retry-after` seconds and gRPC's own
`grpc-retry-pushback-ms`, which clients with a retry policy honour).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

from server.core.errors import ServerError
from server.rpc import status
from server.service import access
from server.service.auth import Authenticator

HEALTH = "health"
REFLECTION = "reflection"
# The role each method needs; methods not named need "infer". Health methods (grpc.health.v1 and the
# server-level liveness/readiness probes) and reflection are open when the config says so.
ROLE_BY_METHOD = {
    "/inference.GRPCInferenceService/ServerLive": HEALTH,
    "/inference.GRPCInferenceService/ServerReady": HEALTH,
    "/inference.GRPCInferenceService/RepositoryIndex": "admin",
    "/inference.GRPCInferenceService/RepositoryModelLoad": "admin",
    "/inference.GRPCInferenceService/RepositoryModelUnload": "admin",
    "/inference.GRPCInferenceService/TraceSetting": "admin",
    "/inference.GRPCInferenceService/LogSettings": "admin",
}
AUTHORIZATION = "authorization"


def role_for(path: str) -> str:
    """The role a method needs: health, reflection, admin or infer."""
    if path.startswith("/grpc.health.v1.Health/"):
        return HEALTH
    if path.startswith("/grpc.reflection."):
        return REFLECTION
    return ROLE_BY_METHOD.get(path, "infer")


def _credential(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _admit(authenticator: Authenticator, role: str, path: str, context: grpc.aio.ServicerContext) -> ServerError | None:
    """Sets the call's principal, or returns why the call is refused (synchronous: no extra await per call)."""
    peer = context.peer() or ""
    if peer.startswith("unix:"):
        return None
    config = authenticator.config.open
    if (role == HEALTH and config.health) or (role == REFLECTION and config.reflection):
        return None
    try:
        # Closed health and reflection need the infer role, as on HTTP.
        needed = "infer" if role in (HEALTH, REFLECTION) else role
        principal = authenticator.admit(_credential(context), needed, path, peer)
    except ServerError as exc:
        return exc
    access.current_principal.set(principal)
    return None


async def _refuse(context: grpc.aio.ServicerContext, exc: ServerError) -> None:
    """Ends the call with the refusal's status and the trailers that tell the client what to do."""
    code, message = status.status_for(exc)
    await context.abort(code, message, trailing_metadata=status.refusal_metadata(exc, context))


def authorized(behaviour: Callable[..., Any], path: str, authenticator: Authenticator) -> Callable[..., Any]:
    """`behaviour` run only for callers the auth config lets call `path` (their principal set for the call)."""
    role = role_for(path)
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refusal = _admit(authenticator, role, path, context)
            if refusal is not None:
                await _refuse(context, refusal)
                return
            async for item in behaviour(request, context):
                yield item

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        refusal = _admit(authenticator, role, path, context)
        if refusal is not None:
            await _refuse(context, refusal)
            return None
        return await behaviour(request, context)

    return call
