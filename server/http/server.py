"""uvicorn in the gRPC server's process and event loop: our own socket, our own signals, a graceful stop.

The socket is made here (not by uvicorn) so that --workers can share the port with
SO_REUSEPORT, as gRPC does, and so that port 0 is resolved before the port file is written.
uvicorn's `serve()` would install its own SIGTERM/SIGINT handlers; the app owns those
(server/app.py), so the server runs without them and is stopped by `stop()`.
With TLS, the app hands over its own `ssl.SSLContext` (server/tls.py), which it reloads in place
when the certificate changes; uvicorn is given that object (not file names, from which it would build
a context of its own), so that its listener and our reloads share the one context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)

# How often start() checks whether uvicorn has started listening.
_START_POLL_S = 0.01


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The app's own handlers stop both front ends, in order; uvicorn must not take the signals.
        yield


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """The HTTP front end's server.

    Args:
        app: The ASGI application (app.create_app).
        host: Address to listen on.
        port: Port (0: a free one).
        reuse_port: Share the port with sibling workers (SO_REUSEPORT).
        log_level: uvicorn's log level.
        ssl_context: Serve HTTPS with this context (None: plain HTTP).
    """

    def __init__(
        self, app: ASGIApp, host: str, port: int, reuse_port: bool, log_level: str = "warning",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._socket = bind_socket(host, port, reuse_port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            http="httptools",
            loop="none",  # the running loop (uvloop when the app chose it)
            lifespan="off",
            log_level=log_level,
            access_log=False,
            log_config=None,  # uvicorn's loggers go through the server's handler (text or JSON, request ids)
            server_header=False,
        )
        if ssl_context is not None:
            # Loaded here rather than in serve() (which skips a loaded config), so the context set after
            # the load is the one serve() gives asyncio: the same object our reloads update.
            config.load()
            config.ssl = ssl_context
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Starts serving; returns once the socket accepts connections."""
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it failed
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(_START_POLL_S)

    async def stop(self, grace_s: float) -> None:
        """Stops accepting connections; requests and streams in flight get up to `grace_s` to finish."""
        if self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace_s))
        self._server.should_exit = True
        try:
            await self._task
        except Exception:  # the server's own failure must not stop the rest of the shutdown
            logger.exception("HTTP server failed while stopping")
        self._task = None
