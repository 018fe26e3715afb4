"""Authentication on the gRPC front end: every method needs a role, checked before the servicer runs.

The credential is the `authorization: Bearer <key or token>` metadata. Calls on the workers'
private Unix socket are trusted (only sibling workers reach it, in a 0700 directory) and carry
no principal. Refusals end the call with UNAUTHENTICATED (and `www-authenticate: Bearer`),
PERMISSION_DENIED or RESOURCE_EXHAUSTED (with `retry-after` seconds and gRPC's own
`grpc-retry-pushback-ms`, which clients with a retry policy honour).
"""

from __future__ import annotations

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


Metadata = tuple[tuple[str, str | bytes], ...]


def _credential(metadata: Metadata) -> str | None:
    for key, value in metadata:
        if key == AUTHORIZATION:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class MethodGate:
    """Who may call one method: `refusal` per call, from the metadata the caller already read.

    Runs inside registration's call wrapper (one coroutine per call for counting, the request id
    and auth together), synchronously: no extra await, no second read of the metadata.
    """

    def __init__(self, authenticator: Authenticator, path: str) -> None:
        self.authenticator = authenticator
        self.path = path
        self.role = role_for(path)
        # Closed health and reflection need the infer role, as on HTTP.
        self.needed = "infer" if self.role in (HEALTH, REFLECTION) else self.role

    def refusal(self, metadata: Metadata, context: grpc.aio.ServicerContext) -> ServerError | None:
        """Sets the call's principal, or returns why the call is refused."""
        opened = self.authenticator.config.open  # read per call: SIGHUP may have changed it
        if (self.role == HEALTH and opened.health) or (self.role == REFLECTION and opened.reflection):
            return None
        credential = _credential(metadata)
        # Sibling workers call over the private Unix socket, without a credential: trusted there only.
        if credential is None and (context.peer() or "").startswith("unix:"):
            return None
        try:
            principal = self.authenticator.admit(credential, self.needed, self.path, context.peer)
        except ServerError as exc:
            return exc
        access.current_principal.set(principal)
        return None


async def refuse(context: grpc.aio.ServicerContext, exc: ServerError) -> None:
    """Ends the call with the refusal's status and the trailers that tell the client what to do."""
    code, message = status.status_for(exc)
    await context.abort(code, message, trailing_metadata=status.refusal_metadata(exc, context))
