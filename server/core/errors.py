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
