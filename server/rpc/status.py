"""The one place where exceptions become gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from server.core import errors
from server.core.batcher import ModelRunError
from server.rpc.registration import MalformedRequest

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    errors.ServerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.ModelLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelRunError: grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


def check_parsed(request: Any) -> None:
    """Raises InvalidInputError for a request body that did not parse."""
    if isinstance(request, MalformedRequest):
        raise errors.InvalidInputError(f"request body is not a valid {request.type_name}: {request.reason}")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception (MRO lookup)."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code, str(exc) or cls.__name__
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _log(exc: BaseException, method: str) -> None:
    if isinstance(exc, errors.ServerError) and not isinstance(exc, ModelRunError):
        logger.info("%s: %s", method, exc)
    else:
        logger.error("%s failed", method, exc_info=exc)


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


async def abort_with(exc: Exception, method: str, context: grpc.aio.ServicerContext) -> None:
    """Logs an exception as its kind deserves and ends the call with its status code."""
    _log(exc, method)
    code, message = status_for(exc)
    await context.abort(code, message)


def unary(handler: Handler) -> Handler:
    """Wraps a unary handler so that every exception ends as a proper status, never UNKNOWN."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            check_parsed(request)
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, handler.__name__, context)

    return wrapper  # type: ignore[return-value]


def streaming(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Wraps a streaming handler (an async generator) with the same mapping."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            check_parsed(request)
            async for item in handler(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(exc, handler.__name__, context)

    return wrapper
