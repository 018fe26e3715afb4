"""The one place where exceptions become HTTP statuses (Triton's mapping), and the error bodies.

The KServe routes answer `{"error": "..."}`; the OpenAI routes answer OpenAI's error object
(`openai_error_body`). Both take the status from the same table, looked up along the
exception's classes, so a new subclass of a domain error maps like its parent.
"""

from __future__ import annotations

import logging

from server.core import errors

# Re-exported: server/http/app.py bounds the framework's own error details with the same cap.
from server.core.errors import MAX_MESSAGE_CHARS as MAX_MESSAGE_CHARS
from server.core.errors import bounded as bounded

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[BaseException], int] = {
    errors.InvalidInputError: 400,
    errors.ModelLoadError: 400,
    errors.ModelNotFoundError: 404,
    errors.ModelNotReadyError: 503,
    errors.ServerUnavailableError: 503,
    errors.UnsupportedError: 501,
    errors.QueueFullError: 429,
    errors.DeadlineExceededError: 504,
    errors.PermissionDeniedError: 403,
    errors.UnauthenticatedError: 401,
    errors.ModelRunError: 500,
}

INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and the client-facing message of an exception.

    Anything that is not a domain error (or a ModelRunError) is a 500 with a short message;
    the details go to the server log (log_error).
    """
    for cls in type(exc).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status, INTERNAL_MESSAGE if status == 500 else bounded(str(exc))
    return 500, INTERNAL_MESSAGE


def log_error(exc: BaseException, where: str) -> None:
    """Client mistakes at info level without a stack; server failures with one."""
    status, _ = status_for(exc)
    if status == 500:
        logger.error("%s failed", where, exc_info=exc)
    else:
        logger.info("%s: %s", where, exc)


def error_body(message: str) -> dict[str, str]:
    """KServe's and Triton's error body."""
    return {"error": message}


# OpenAI's `type` field for each status the table gives.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def openai_error_body(status: int, message: str, param: str | None = None) -> dict[str, object]:
    """OpenAI's error object for a status and message."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
