"""Domain exceptions, known to no transport; each front end maps them to its own codes (rpc/status.py for gRPC)."""


class ServerError(Exception):
    """Base of every error that ortserve reports to a client on purpose."""


class InvalidInputError(ServerError):
    """The request is malformed: shape, datatype, byte count, names, parameters."""


class ModelNotFoundError(ServerError):
    """No model (or no such version of it) exists in the repository."""


class ModelNotReadyError(ServerError):
    """The model exists but is not ready to serve (failed to load, loading, unloading)."""


class ServerUnavailableError(ServerError):
    """The server is shutting down and takes no new work."""


class QueueFullError(ServerError):
    """The model's queue is at its limit; the client should retry later."""


class DeadlineExceededError(ServerError):
    """The request's deadline passed before it could run."""


class UnsupportedError(ServerError):
    """The request asks for a feature this server does not implement."""


class PermissionDeniedError(ServerError):
    """The operation is refused by the server's configuration."""


class UnauthenticatedError(ServerError):
    """The request carries no credentials, or credentials the server does not accept (--auth-config)."""


class RateLimitedError(QueueFullError):
    """The principal is over its rate or stream limit (--auth-config); retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelRunError(ServerError):
    """ONNX Runtime failed while running a batch that passed validation (answered as an internal error)."""


class ModelLoadError(ServerError):
    """A model could not be loaded; the message says why (shown in RepositoryIndex)."""


# Client-supplied text (names, versions, parameter values) is quoted in messages only up to
# this many characters: an unbounded echo can exceed gRPC's metadata limits (the client then
# sees RESOURCE_EXHAUSTED instead of the real error) and fills logs.
QUOTE_LIMIT = 64


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr` of client-supplied text, cut to `limit` characters with a marker when longer."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


# The most characters of an error message sent to a client, whatever the front end. gRPC sends it
# in the grpc-message trailer, and past the peer's metadata limit (16 KiB by default) the client
# sees RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of the real error; HTTP keeps
# the same cap so that both front ends answer the same text. Messages quote client text through
# quoted(); this cap holds whatever any layer puts in one.
MAX_MESSAGE_CHARS = 2000
_CUT_MARKER = " ... (message cut)"


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to at most `limit` characters, with a marker when it was longer."""
    if len(message) <= limit:
        return message
    return message[: limit - len(_CUT_MARKER)] + _CUT_MARKER


# A library's error (ONNX Runtime, onnx) relayed in a ServerError keeps only its first line, at most
# this many characters: those messages run to pages and name internal paths, and the first line says
# what failed. One length for every relay (it was 200 for runs and warm-ups, 300 for session
# creation): 200 leaves room for the server's own prefix in a RepositoryIndex reason or a status
# message that stays short enough to read in one line of a log or a client's exception.
FIRST_LINE_CHARS = 200


def first_line(exc: BaseException, limit: int = FIRST_LINE_CHARS, empty: str = "") -> str:
    """The first line of an exception's message, cut to `limit` characters.

    Args:
        exc: The library's exception.
        limit: Most characters kept.
        empty: What to say when the message is empty; the exception's class name by default.
    """
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else (empty or type(exc).__name__)
