"""Server-sent events: one `data: <json>\\n\\n` event per item of an async iterator.

Used by the OpenAI streaming routes and by KServe's `generate_stream`. The contract:

    events = await prefetch(source)        # optional: errors before the first event raise here,
                                           # so the route can still answer with a status code
    return EventStream(
        events,                            # AsyncIterator of dict/list (orjson-encoded), bytes or str (verbatim)
        error_event=lambda exc: {...},     # payload of a last event when the source raises mid-stream
                                           # (None: the stream just ends; the error is logged)
        done="[DONE]",                     # a last `data: [DONE]` after a clean end (OpenAI); None for none
        max_buffered_events=256,           # events produced but not yet written to the socket
    )

Disconnect detection: a task reads ASGI `receive()` for `http.disconnect` while the stream
runs; when the client leaves, the task that iterates the source is cancelled at once, so
CancelledError reaches the data plane's generator while it waits for its next token (the
generation scheduler then drops the row before its next decode step), not at the next write.

Bounded buffering: the source is read by its own task into a buffer of at most
`max_buffered_events` events, and a writer task sends them. A client that stops reading
makes the socket writes block (uvicorn's flow control); the buffer then fills, and the stream
is cancelled (source closed, response ended) instead of holding every token in memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

# Events held for a slow reader before the stream is cancelled: a generation stream makes one
# event per token, and 256 events of a few hundred bytes each stay well under a megabyte.
DEFAULT_MAX_BUFFERED_EVENTS = 256

_SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) must not collect the stream into one answer.
    "X-Accel-Buffering": "no",
}


def encode_event(item: Any) -> bytes:
    """One SSE event: `data: <payload>\\n\\n`; dicts and lists as JSON, bytes and str verbatim.

    A str with newlines becomes one `data:` line per line, as the SSE format requires.
    """
    if isinstance(item, bytes):
        payload = item
    elif isinstance(item, str):
        payload = item.encode()
    else:
        payload = orjson.dumps(item)
    if b"\n" in payload:
        return b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n")) + b"\n"
    return b"data: " + payload + b"\n\n"


class _Prefetched:
    """An async iterator that yields an item already taken from `rest` first."""

    def __init__(self, first: Any, rest: AsyncIterator[Any]) -> None:
        self._first: list[Any] = [first]
        self._rest = rest

    def __aiter__(self) -> _Prefetched:
        return self

    async def __anext__(self) -> Any:
        if self._first:
            return self._first.pop()
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await close_source(self._rest)


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # makes this an async generator


async def prefetch(source: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Takes the first item now, so that an error before it (a bad request, an unknown model, a full
    queue) raises in the route, which still can answer with a status code.

    Returns:
        An iterator yielding the first item then the rest of `source` (empty when it had none).
    """
    try:
        first = await source.__anext__()
    except StopAsyncIteration:
        return _empty()
    except BaseException:
        await close_source(source)
        raise
    return _Prefetched(first, source)


async def close_source(source: Any) -> None:
    """Closes an async iterator that has `aclose` (an async generator), logging rather than raising.

    An async generator that iterates another must close it in its own `finally`: closing the
    outer one does not close what its `async for` was reading.
    """
    close = getattr(source, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - closing must not mask the reason the stream ended
            logger.debug("closing an event source failed", exc_info=True)


class EventStream(Response):
    """A `text/event-stream` response over an async iterator; see the module docstring.

    Args:
        events: The items; each becomes one event (encode_event).
        error_event: Payload of a last event when the source raises a non-cancellation error
            mid-stream; None ends the stream without one.
        done: Payload of the last event after a clean end (OpenAI's "[DONE]"), or None.
        max_buffered_events: Events produced but not yet written before the stream is cancelled.
        headers: Extra response headers.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[Any],
        *,
        error_event: Callable[[Exception], Any] | None = None,
        done: str | None = None,
        max_buffered_events: int = DEFAULT_MAX_BUFFERED_EVENTS,
        headers: dict[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        if max_buffered_events < 1:
            raise ValueError("max_buffered_events must be at least 1")
        self.events = events
        self.error_event = error_event
        self.done = done
        self.max_buffered_events = max_buffered_events
        self.status_code = 200
        self.background = background
        self.init_headers({**_SSE_HEADERS, **(headers or {})})
        # Set after a run: why the stream ended ("done", "error", "disconnect", "overflow").
        self.outcome = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        buffer: collections.deque[bytes] = collections.deque()
        ready = asyncio.Event()  # set when the buffer has data or the producer finished
        finished = False
        overflow = False

        async def produce() -> None:
            nonlocal finished, overflow
            try:
                async for item in self.events:
                    if len(buffer) >= self.max_buffered_events:
                        overflow = True
                        logger.info("event stream cancelled: the client reads slower than it is produced "
                                    "(%d events buffered)", len(buffer))
                        return
                    buffer.append(encode_event(item))
                    ready.set()
                self.outcome = "done"
                if self.done is not None:
                    buffer.append(encode_event(self.done))
            except Exception as exc:  # noqa: BLE001 - reported in the stream, which has already started
                self.outcome = "error"
                if self.error_event is None:
                    logger.warning("event stream ended by an error: %s", exc)
                else:
                    logger.info("event stream ended by an error: %s", exc)
                    buffer.append(encode_event(self.error_event(exc)))
            finally:
                finished = True
                ready.set()
                await close_source(self.events)

        async def write() -> None:
            while True:
                await ready.wait()
                ready.clear()
                while buffer:
                    # Everything produced since the last write goes out in one write: under load the
                    # events of several steps wait here together, and one send costs what one event does.
                    body = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
                    buffer.clear()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                if finished:
                    return

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        producer = asyncio.ensure_future(produce())
        writer = asyncio.ensure_future(write())
        watcher = asyncio.ensure_future(watch())
        disconnected = False
        try:
            await asyncio.wait({producer, writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if producer.done() and not overflow:
                # The source ended: let the writer flush the rest unless the client leaves.
                await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            # A write that fails (OSError) means the client left; after an overflow the client is
            # not reading, so the end of the body is not sent either (uvicorn closes the connection).
            writer_failed = writer.done() and not writer.cancelled() and writer.exception() is not None
            disconnected = watcher.done() or writer_failed or overflow
            if overflow:
                self.outcome = "overflow"
        finally:
            for task in (producer, writer, watcher):
                task.cancel()
            await asyncio.gather(producer, writer, watcher, return_exceptions=True)
            if disconnected and not self.outcome:
                self.outcome = "disconnect"
        if not disconnected:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client left between the last event and the end
        if self.background is not None:
            await self.background()
