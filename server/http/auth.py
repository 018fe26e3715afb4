"""Authentication on the HTTP front end (and the metrics port): an ASGI middleware before every route.

The role a request needs follows its path: `/v2/health/*` is health (open by default, so
Kubernetes probes work), `/metrics` needs metrics, `/v2/repository/*` and Triton's trace and
log settings need admin, everything else (inference, metadata, the OpenAI routes, the OpenAPI
document, unknown paths) needs infer. The credential is `Authorization: Bearer <key or token>`.
Refusals answer 401 with `WWW-Authenticate: Bearer`, 403, or 429 with `Retry-After`, in the
route's error vocabulary, before the body is read.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.core.errors import RateLimitedError, ServerError, UnauthenticatedError
from server.http.errors import status_for
from server.service import access
from server.service.auth import Authenticator

ADMIN_PREFIXES = ("/v2/repository/", "/v2/trace/", "/v2/logging")


def role_for(path: str) -> str:
    """The role an HTTP path needs: health, metrics, admin or infer."""
    if path.startswith("/v2/health/"):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path.startswith(ADMIN_PREFIXES) or path.startswith("/v2/models/") and path.endswith("/trace/setting"):
        return "admin"
    return "infer"


def refusal_headers(exc: BaseException) -> dict[str, str]:
    """The headers that tell a refused client what to do."""
    if isinstance(exc, UnauthenticatedError):
        return {"WWW-Authenticate": 'Bearer realm="ortserve", error="invalid_token"'}
    if isinstance(exc, RateLimitedError):
        return {"Retry-After": str(access.retry_after_seconds(exc.retry_after_s))}
    return {}


class RequireAuth:
    """Lets a request through only when its credential allows the role its path needs.

    Args:
        app: The application behind it.
        authenticator: The auth config in force (reloaded in place on SIGHUP).
        error_response: Builds an error answer in the route's vocabulary (path, status, message).
    """

    def __init__(
        self, app: ASGIApp, authenticator: Authenticator, error_response: Callable[[str, int, str], Response]
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        role = role_for(path)
        opened = self.authenticator.config.open
        if (role == "health" and opened.health) or (role == "metrics" and opened.metrics):
            await self.app(scope, receive, send)
            return
        credential = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                credential = value.decode("latin-1")
                break
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else ""
        try:
            principal = self.authenticator.admit(
                credential, "infer" if role == "health" else role, f"{scope['method']} {path}"[:200], peer
            )
        except ServerError as exc:
            status, message = status_for(exc)
            response = self.error_response(path, status, message)
            response.headers.update(refusal_headers(exc))
            await response(scope, receive, send)
            return
        access.current_principal.set(principal)
        await self.app(scope, receive, send)
