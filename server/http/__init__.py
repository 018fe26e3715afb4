"""The HTTP front end: KServe v2 REST with Triton's extensions, Triton's generate extension, OpenAI routes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from server.service.dataplane import DataPlane

T = TypeVar("T")


class ClientDisconnectedError(Exception):
    """The client closed the connection before its answer was ready."""


def data_plane(request: Request) -> DataPlane:
    """The data plane every route serves from (set on the app by server/http/app.py)."""
    plane: DataPlane = request.app.state.plane
    return plane


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it the moment the client disconnects.

    Starlette does not cancel a route when its client leaves; without this, a request
    whose client has gone would stay queued and run. The body must have been read already:
    after it, the only message `receive` can deliver is the disconnect.

    Raises:
        ClientDisconnectedError: the client left first (`work` was cancelled).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientDisconnectedError()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
