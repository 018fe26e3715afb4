"""Prometheus metrics over HTTP: the text exposition format, the /metrics route, and the request counter.

The text is written here rather than by prometheus_client: its writer always appends
`_total` to a counter family's name (and strips it from the name it is given), while
Triton's counters have no suffix (`# TYPE nv_inference_count counter`) and Triton's
dashboards query them by those exact names. The format itself (version 0.0.4) is small.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core.histogram import Histogram
from server.http.auth import RequireAuth
from server.logs import access, new_request_id, request_id
from server.service.auth import Authenticator
from server.service.dataplane import DataPlane
from server.service.metrics import Family, RequestCounter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Methods counted by name; anything else a client sends counts as "other", so a client
# cannot make the counter grow a series per made-up method.
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})


def _number(value: float) -> str:
    value = float(value)  # an int from a caller formats the same (int has no is_integer before 3.12)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_label_value(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


@functools.lru_cache(maxsize=64)
def _les(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The `le` values of a bucket layout, +Inf last (a few layouts only: cached)."""
    return (*(repr(float(b)) for b in bounds), "+Inf")


def render(families: Sequence[Family]) -> bytes:
    """The families in Prometheus's text format (0.0.4); histograms as cumulative `_bucket`s, `_sum`, `_count`."""
    lines: list[str] = []
    for family in families:
        help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {family.name} {help_text}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for values, value in family.samples.items():
            labels = _labels(family.labels, values)
            if isinstance(value, Histogram):
                # The series' labels are written once; each bucket line adds its `le` to them.
                bucket = f"{family.name}_bucket{{{labels[1:-1]}{',' if labels else ''}le="
                les = _les(value.bounds)
                lines.extend(f'{bucket}"{le}"}} {count}' for le, count in zip(les, value.cumulative(), strict=True))
                lines.append(f"{family.name}_sum{labels} {_number(value.sum)}")
                lines.append(f"{family.name}_count{labels} {value.count}")
            else:
                lines.append(f"{family.name}{labels} {_number(value)}")
    lines.append("")
    return "\n".join(lines).encode("utf-8")


async def metrics_response(plane: DataPlane) -> Response:
    """The whole server's metrics (every worker's), as a scrape answer."""
    return Response(render(await plane.metrics()), media_type=CONTENT_TYPE)


def create_metrics_app(plane: DataPlane, authenticator: Authenticator | None = None) -> Starlette:
    """The metrics port's application: GET /metrics, nothing else (404); with --auth-config, the metrics role."""

    async def endpoint(request: Request) -> Response:
        return await metrics_response(plane)

    app = Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])
    if authenticator is not None:
        app.add_middleware(RequireAuth, authenticator=authenticator, error_response=_plain_error)
    return app


def _plain_error(path: str, status: int, message: str) -> Response:
    return Response(message + "\n", status_code=status, media_type="text/plain; charset=utf-8")


class ObserveRequests:
    """Per HTTP request: its id, its count in the metrics, and (with --log-requests) an access-log line.

    The request id is the client's `X-Request-Id` header, or the `id` of a KServe body (the
    route adopts it), or a new one; the answer carries it back in `X-Request-Id`.
    Counted by method, route template and status code. The route is the template the request
    matched (`/v2/models/{name}/infer`), never the raw path, so series do not grow with model
    names or made-up paths; an unmatched path counts as "unmatched". A request that ends
    without a response counts as 500.
    """

    def __init__(self, app: ASGIApp, counter: RequestCounter, access_log: bool = False) -> None:
        self.app = app
        self.counter = counter
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id.set(new_request_id(given))
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.get().encode("latin-1", "replace")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.counter.count(method, template, str(status))
            if self.access_log:
                model = str(scope.get("path_params", {}).get("name", "") or "")
                access("HTTP", f"{method} {template}", model, str(status), started)
