"""The FastAPI application: the routers, the body limit, and the one translation of errors into statuses."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core.errors import ServerError
from server.http import ClientDisconnectedError, embeddings, kserve, openai
from server.http.auth import RequireAuth, refusal_headers
from server.http.errors import bounded, error_body, log_error, openai_error_body, status_for
from server.http.kserve import json_response
from server.http.metrics import ObserveRequests, metrics_response
from server.service.auth import Authenticator
from server.service.dataplane import DataPlane

logger = logging.getLogger(__name__)

# Routes under this prefix answer errors with OpenAI's error object.
OPENAI_PREFIX = "/v1/"


class BodyTooLargeError(Exception):
    """The request body passed --http-max-body-bytes while it was being read."""


def create_app(
    plane: DataPlane, max_body_bytes: int, version: str = "", metrics: bool = True, access_log: bool = False,
    authenticator: Authenticator | None = None,
) -> FastAPI:
    """The HTTP application over a data plane.

    Args:
        plane: The data plane every route serves from.
        max_body_bytes: The largest request body; larger ones get 413, unread.
        version: The server version shown in the OpenAPI document.
        metrics: Serve GET /metrics (Prometheus) here too, beside the metrics port.
        access_log: Log a line per request (--log-requests).
        authenticator: With --auth-config: every route needs a credential allowed its role (http/auth.py).
    """
    app = FastAPI(
        title="ortserve",
        version=version or "0",
        description="KServe v2 REST with Triton's extensions, Triton's generate extension, OpenAI-compatible routes.",
    )
    app.state.plane = plane
    app.include_router(kserve.router)
    app.include_router(openai.router)  # OpenAI-compatible routes (server/http/openai.py)
    app.include_router(embeddings.router)  # POST /v1/embeddings (server/http/embeddings.py)
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(BodyTooLargeError, _too_large)
    app.add_exception_handler(ClientDisconnectedError, _disconnected)
    app.add_exception_handler(Exception, _unexpected)
    if metrics:
        app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    if authenticator is not None:
        # Outside the body limit: an unauthenticated request is refused before its body is read.
        app.add_middleware(RequireAuth, authenticator=authenticator, error_response=error_response)
    # Outermost: it sees every answer, 413s included, and tags every log line with the request id.
    app.add_middleware(ObserveRequests, counter=plane.http_requests, access_log=access_log)
    return app


async def _metrics(request: Request) -> Response:
    return await metrics_response(request.app.state.plane)


def error_response(path: str, status: int, message: str) -> Response:
    """An error answer in the vocabulary of the route: OpenAI's object under /v1/, else {"error": ...}."""
    if path.startswith(OPENAI_PREFIX):
        return json_response(openai_error_body(status, message), status)
    return json_response(error_body(message), status)


async def _server_error(request: Request, exc: Exception) -> Response:
    log_error(exc, f"{request.method} {request.url.path}")
    status, message = status_for(exc)
    response = error_response(request.url.path, status, message)
    response.headers.update(refusal_headers(exc))  # Retry-After of a principal's stream limit
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = error_response(request.url.path, exc.status_code, bounded(str(exc.detail)))
    if exc.headers:
        response.headers.update(exc.headers)  # 405's Allow
    return response


async def _too_large(request: Request, exc: Exception) -> Response:
    return error_response(request.url.path, 413, str(exc))


async def _disconnected(request: Request, exc: Exception) -> Response:
    # Nobody reads this answer; the request was cancelled where it waited.
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log_error(exc, f"{request.method} {request.url.path}")
    return error_response(request.url.path, *status_for(exc))


class BodyLimit:
    """Refuses bodies over the limit with 413 without reading them into memory.

    A Content-Length over the limit is answered at once, before any of the body is read;
    a chunked body is counted as it arrives and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    message = f"request body is over the limit of {limit} bytes"
                    if not value.isdigit():
                        message = "Content-Length is not a number"
                    status = 413 if value.isdigit() else 400
                    response = error_response(scope["path"], status, message)
                    # The connection must close: the unread body would be taken for the next request.
                    response.headers["Connection"] = "close"
                    await response(scope, receive, send)
                    return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)
