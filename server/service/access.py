"""Access control inside the data plane: the caller's principal, its model patterns, its limits.

A front end authenticates each call (service/auth.py) and sets `current_principal` for it;
the data plane then asks `check_model` before it touches a model, so every transport and
every route that names a model (an ensemble's steps included) is checked in one place. No
principal (None) means no auth config, or a sibling worker on the private socket: all allowed.

A model the principal may not use answers PERMISSION_DENIED / 403 whether or not it exists,
so the answer does not reveal which models the server has; listings leave such models out.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from server.core.errors import PermissionDeniedError, RateLimitedError, quoted
from server.service.auth_config import RateLimit

# Token buckets kept at most; past it, full (idle) buckets are dropped first.
MAX_TRACKED_PRINCIPALS = 10000


@dataclass(frozen=True)
class Principal:
    """Who is calling: a name for logs, roles, the model patterns it may use, its limits."""

    name: str
    roles: frozenset[str]
    models: tuple[str, ...]
    limits: RateLimit | None = None
    kind: str = "api-key"
    _allowed: dict[str, bool] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def may_use(self, model: str) -> bool:
        """Whether `model` matches one of the principal's patterns (fnmatch globs, case-sensitive)."""
        allowed = self._allowed.get(model)
        if allowed is None:
            allowed = any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)
            if len(self._allowed) < 1024:  # names come from clients: bound what is remembered
                self._allowed[model] = allowed
        return allowed


current_principal: ContextVar[Principal | None] = ContextVar("ortserve_principal", default=None)


def check_model(name: str) -> None:
    """Refuses a model the current principal may not use.

    Raises:
        PermissionDeniedError: the principal's model patterns do not match `name`.
    """
    principal = current_principal.get()
    if principal is not None and not principal.may_use(name):
        raise PermissionDeniedError(f"principal '{principal.name}' may not use model {quoted(name)}")


def visible(name: str) -> bool:
    """Whether the current principal may see `name` in a listing."""
    principal = current_principal.get()
    return principal is None or principal.may_use(name)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    full_at: float = 0.0  # when it will have refilled completely: from then on it holds no information


class RequestRates:
    """Per-principal token buckets: requests per second with a burst (the authenticator takes one per call).

    Over the limit is refused at once (RateLimitedError, with when to retry), never queued. The
    state lives in this process: with --workers N each worker keeps its own buckets.
    """

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def forget(self) -> None:
        """Drops the buckets (after a config reload: the limits may have changed)."""
        self._buckets.clear()

    def admit(self, principal: Principal) -> None:
        """Takes one request from the principal's bucket.

        Raises:
            RateLimitedError: the bucket is empty; retry_after_s says when one request's worth is back.
        """
        limits = principal.limits
        if limits is None or limits.requests_per_second is None:
            return
        rate, size = limits.requests_per_second, limits.bucket_size()
        now = time.monotonic()
        bucket = self._buckets.get(principal.name)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_PRINCIPALS:
                self._prune(now)
            bucket = self._buckets[principal.name] = _Bucket(size, now)
        bucket.tokens = min(size, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / rate
            raise RateLimitedError(
                f"principal '{principal.name}' is over its limit of {rate:g} requests per second", wait
            )
        bucket.tokens -= 1.0
        bucket.full_at = now + (size - bucket.tokens) / rate

    def _prune(self, now: float) -> None:
        # A bucket that has refilled completely is the same as a new one: dropping it changes nothing.
        for name, bucket in list(self._buckets.items()):
            if now >= bucket.full_at:
                del self._buckets[name]


class StreamSlots:
    """Per-principal counts of running generation streams (the data plane holds one per generation), in
    this process. Over max_streams is refused at once, never queued."""

    def __init__(self) -> None:
        self._streams: dict[str, int] = {}

    @contextlib.contextmanager
    def stream(self, principal: Principal | None) -> Iterator[None]:
        """Holds one of the principal's concurrent generation streams for the block.

        Raises:
            RateLimitedError: the principal already has max_streams generations running.
        """
        limit = principal.limits.max_streams if principal is not None and principal.limits is not None else None
        if principal is None or limit is None:
            yield
            return
        running = self._streams.get(principal.name, 0)
        if running >= limit:
            raise RateLimitedError(
                f"principal '{principal.name}' already has {running} generation stream(s) running (limit {limit})",
                1.0,
            )
        self._streams[principal.name] = running + 1
        try:
            yield
        finally:
            left = self._streams.get(principal.name, 1) - 1
            if left > 0:
                self._streams[principal.name] = left
            else:
                self._streams.pop(principal.name, None)


def retry_after_seconds(wait_s: float) -> int:
    """A Retry-After value in whole seconds (HTTP's delta-seconds), never 0."""
    return max(1, math.ceil(wait_s))
