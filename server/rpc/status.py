"""The one place where exceptions become gRPC status codes."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from server.core import errors

# Re-exported: status messages are cut to this cap (tests read it from here).
from server.core.errors import MAX_MESSAGE_CHARS as MAX_MESSAGE_CHARS
from server.core.errors import bounded as bounded
from server.service.access import retry_after_seconds

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
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.ModelLoadError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelRunError: grpc.StatusCode.INTERNAL,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse (see registration.py)."""

    type_name: str
    reason: str


def check_parsed(request: Any) -> None:
    """Raises InvalidInputError for a request body that did not parse."""
    if isinstance(request, MalformedRequest):
        raise errors.InvalidInputError(
            f"request body is not a valid {request.type_name}: {bounded(request.reason, 200)}"
        )


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception (MRO lookup)."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code, bounded(str(exc) or cls.__name__)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _log(exc: BaseException, method: str) -> None:
    if isinstance(exc, errors.ServerError) and not isinstance(exc, errors.ModelRunError):
        logger.info("%s: %s", method, exc)
    else:
        logger.error("%s failed", method, exc_info=exc)


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def refusal_metadata(exc: BaseException, context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    """The call's trailing metadata plus what tells a refused client what to do (abort replaces the set)."""
    if isinstance(exc, errors.UnauthenticatedError):
        hint: tuple[tuple[str, str], ...] = (("www-authenticate", 'Bearer realm="ortserve"'),)
    elif isinstance(exc, errors.RateLimitedError):
        pushback_ms = max(1, int(exc.retry_after_s * 1000))
        hint = (("retry-after", str(retry_after_seconds(exc.retry_after_s))),
                ("grpc-retry-pushback-ms", str(pushback_ms)))
    else:
        return ()
    return (*(context.trailing_metadata() or ()), *hint)


async def abort_with(exc: Exception, method: str, context: grpc.aio.ServicerContext) -> None:
    """Logs an exception as its kind deserves and ends the call with its status code."""
    _log(exc, method)
    code, message = status_for(exc)
    await context.abort(code, message, trailing_metadata=refusal_metadata(exc, context))


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


def guard(behaviour: Callable[..., Any], client_streaming: bool, server_streaming: bool) -> Callable[..., Any]:
    """Wraps a servicer method we did not write (health, reflection) so that a request body that
    did not parse ends as INVALID_ARGUMENT instead of reaching it (where it fails as UNKNOWN).

    Args:
        behaviour: The servicer's bound method (a coroutine function or an async generator function).
        client_streaming: Whether it takes a request iterator.
        server_streaming: Whether it answers with a stream.

    Returns:
        A handler of the same shape for grpc's `*_rpc_method_handler`.
    """
    name = getattr(behaviour, "__name__", "handler")
    if client_streaming:

        async def checked_requests(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    try:
                        check_parsed(request)
                    except errors.InvalidInputError as exc:
                        await abort_with(exc, name, context)
                yield request

        if server_streaming:

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async for item in behaviour(checked_requests(requests, context), context):
                    yield item

            return stream_stream

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(checked_requests(requests, context), context)

        return stream_unary

    async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            check_parsed(request)
        except errors.InvalidInputError as exc:
            await abort_with(exc, name, context)

    if server_streaming and inspect.isasyncgenfunction(behaviour):

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(request, context)
            async for item in behaviour(request, context):
                yield item

        return unary_stream

    # A unary handler, or a streaming one that writes through context.write (health's Watch).
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(request, context)
        return await behaviour(request, context)

    return unary
