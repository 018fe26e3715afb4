"""Composition root: builds the registry, the gRPC server and its services; runs until stopped."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from importlib import metadata
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server import workers
from server.core.errors import ServerError
from server.http.app import create_app
from server.http.metrics import create_metrics_app
from server.http.server import HttpServer
from server.repository.registry import ModelRegistry
from server.repository.repository import ModelRepository
from server.rpc.generation_servicer import TextGenerationServicer
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.peers import GrpcPeers
from server.rpc.registration import (
    GENERATION_SERVICE,
    CallObserver,
    add_generation_service,
    add_health_service,
    add_inference_service,
    add_peer_metrics_service,
    add_reflection_service,
)
from server.rpc.servicers import InferenceServicer
from server.runtime import cpus
from server.schema import _pool
from server.service.auth import Authenticator
from server.service.auth_config import AuthConfigError
from server.service.control import decode_override
from server.service.dataplane import DataPlane, ServerState, WorkerPeers
from server.settings import Settings
from server.tls import CertificateFiles, ReloadingContext, grpc_credentials

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# How often shutdown checks whether the models still hold admitted work.
DRAIN_POLL_S = 0.01
# How often a pinned worker lets go of gRPC threads started since it last looked (OrtServer._release_grpc_threads).
GRPC_THREADS_RESCAN_S = 5.0


def server_version() -> str:
    """The installed distribution's version."""
    try:
        return metadata.version("ortserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _reflection_pool() -> object:
    """Our private descriptor pool, plus the health and reflection files so `grpcurl describe` finds them."""
    for module in (health_pb2, reflection_pb2):
        try:
            _pool.POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            _pool.POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return _pool.POOL


class OrtServer:
    """The running server: models, gRPC services, health and reflection.

    Args:
        settings: Server settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(
            ModelRepository(settings.model_repository),
            settings.device,
            settings.default_max_batch_size,
            on_change=self._schedule_health,
        )
        self.state = ServerState(settings.strict_readiness)
        self.health = health.aio.HealthServicer()
        self.plane = DataPlane(self.registry, self.state, server_version(), settings.model_control_mode)
        self._background: set[asyncio.Task[None]] = set()
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._metrics: HttpServer | None = None
        # TLS on the public ports (None: plaintext); the HTTP context is shared by HTTP and metrics.
        self._certificates = self._load_certificates()
        self._ssl = ReloadingContext(self._certificates) if self._certificates is not None else None
        self.authenticator = self._load_auth()
        self._warn_if_open()

    def _load_auth(self) -> Authenticator | None:
        """The auth config, validated now, so a bad file stops the start with a message naming the entry."""
        if self.settings.auth_config is None:
            return None
        try:
            authenticator = Authenticator(self.settings.auth_config)
        except AuthConfigError as exc:
            raise SystemExit(str(exc)) from exc
        config = authenticator.config
        logger.info(
            "auth: %d API key(s), JWT %s; open without credentials: %s", len(config.api_keys),
            "on" if config.jwt is not None else "off",
            ", ".join(k for k, v in config.open.model_dump().items() if v) or "nothing",
        )
        return authenticator

    def _warn_if_open(self) -> None:
        """Safe by default: say clearly when the ports are open to whoever reaches them."""
        if self.settings.worker_index not in (None, 0):
            return  # one warning per server, not one per worker
        if self.authenticator is None and self.settings.model_control_mode == "explicit":
            logger.warning(
                "--model-control-mode explicit without --auth-config: anyone who reaches the ports can load and "
                "unload models"
            )
        if self.settings.host in ("0.0.0.0", "::", "") and self._certificates is None and self.authenticator is None:
            logger.warning(
                "listening on all interfaces (--host %s) without TLS or --auth-config: anyone who reaches the "
                "ports can run every model; see the README's security section", self.settings.host or "''",
            )

    def _load_certificates(self) -> CertificateFiles | None:
        """The TLS files, loaded and checked now, so a bad pair stops the start with a clear message."""
        cert, key = self.settings.tls_cert, self.settings.tls_key
        if cert is None or key is None:
            return None
        try:
            return CertificateFiles(cert, key, self.settings.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(f"TLS: could not load the certificate {cert} with the key {key}: {exc}") from exc

    async def start(self) -> int:
        """Loads the models, then starts listening; returns the bound port."""
        if not self.settings.model_repository.is_dir():
            raise SystemExit(f"model repository {self.settings.model_repository} is not a directory")
        worker = self.settings.worker_index
        peer_dir = self.settings.peer_dir
        # A worker in explicit mode holds the control lock (shared) from reading the model set
        # until its private socket listens, so no load or unload can miss it (workers.py).
        control_fd = None
        if worker is not None and peer_dir is not None and self.settings.model_control_mode == "explicit":
            control_fd = await workers.lock_control(peer_dir, exclusive=False)
        await self._load_startup_models()
        options = [
            ("grpc.max_receive_message_length", self.settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_send_message_bytes),
            # Only workers share a port; a lone server must not silently share one by accident.
            ("grpc.so_reuseport", 1 if worker is not None else 0),
        ]
        if self.settings.grpc_max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", int(self.settings.grpc_max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.settings.shutdown_grace_s * 1000)),
            ]
        server = grpc.aio.server(options=options)
        observer = CallObserver(self.plane.grpc_requests, self.settings.log_requests)
        auth = self.authenticator
        add_inference_service(InferenceServicer(self.plane), server, observer, auth)
        add_generation_service(TextGenerationServicer(self.plane), server, observer, auth)
        add_health_service(self.health, server, observer, auth)
        services = [INFERENCE_SERVICE, GENERATION_SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME]
        add_reflection_service(reflection.aio.ReflectionServicer(services, pool=_reflection_pool()), server, auth)
        public = f"{self.settings.host}:{self.settings.port}"
        try:
            if self._certificates is not None:
                self.port = server.add_secure_port(public, grpc_credentials(self._certificates))
            else:
                self.port = server.add_insecure_port(public)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise SystemExit(f"could not listen on {self.settings.host}:{self.settings.port}")
        if worker is not None and self.settings.peer_dir is not None:
            # Plaintext even with TLS: only sibling workers reach it, in the supervisor's 0700 directory.
            server.add_insecure_port(f"unix:{workers.worker_socket(self.settings.peer_dir, worker)}")
            add_peer_metrics_service(self.plane.local_metrics_json, server)
            addresses = workers.peer_addresses(self.settings.peer_dir, worker, self.settings.workers)
            self.plane.attach_workers(WorkerPeers(GrpcPeers(), tuple(addresses), self.settings.peer_dir, worker))
        await server.start()
        if self.settings.allow_http:
            await self._start_http(reuse_port=worker is not None)
        if self.settings.allow_metrics:
            await self._start_metrics(reuse_port=worker is not None)
        if control_fd is not None:
            workers.unlock_control(control_fd)
        self._server = server
        self.state.started = True
        await self._publish_health()
        if self._ssl is not None and (self._http is not None or self._metrics is not None):
            self._spawn(self._ssl.watch())  # gRPC looks at the files itself, at each new handshake
        if self.settings.model_control_mode == "poll":
            self._spawn(self._poll_repository())
        pinned = cpus.pinned_cpus()
        if pinned is not None:
            self._spawn(self._release_grpc_threads())  # gRPC's own threads exist now (see cpus.pin_worker)
        if worker is not None and self.settings.peer_dir is not None:
            logger.info(
                "worker %d (pid %d) serving on port %d%s", worker, os.getpid(), self.port,
                f", pinned to CPU(s) {','.join(map(str, pinned))}" if pinned else "",
            )
            workers.mark_ready(self.settings.peer_dir, worker)
            return self.port
        logger.info("ortserve listening on %s:%d", self.settings.host, self.port)
        # Before the gRPC port file, which readers wait for.
        for path, port in ((self.settings.http_port_file(), self.http_port),
                           (self.settings.metrics_port_file(), self.metrics_port)):
            if path is not None and port:
                path.write_text(str(port))
        if self.settings.port_file:
            self.settings.port_file.write_text(str(self.port))
        return self.port

    async def _start_http(self, reuse_port: bool) -> None:
        """The HTTP front end over the same data plane, in this process and event loop."""
        app = create_app(
            self.plane, self.settings.resolved_http_max_body_bytes(), server_version(), self.settings.allow_metrics,
            self.settings.log_requests, self.authenticator,
        )
        self._http = await self._listen(app, self.settings.http_port, reuse_port, "HTTP")
        self.http_port = self._http.port

    async def _start_metrics(self, reuse_port: bool) -> None:
        """Prometheus metrics on their own port (Triton's 8002), in this process and event loop."""
        app = create_metrics_app(self.plane, self.authenticator)
        self._metrics = await self._listen(app, self.settings.metrics_port, reuse_port, "metrics")
        self.metrics_port = self._metrics.port

    async def _listen(self, app: Any, port: int, reuse_port: bool, what: str) -> HttpServer:
        try:
            context = self._ssl.context if self._ssl is not None else None
            server = HttpServer(app, self.settings.host, port, reuse_port, "warning", context)
        except OSError as exc:
            raise SystemExit(f"could not listen on {self.settings.host}:{port} ({what}): {exc}") from exc
        await server.start()
        logger.info("%s on %s:%d", what, self.settings.host, server.port)
        return server

    async def _load_startup_models(self) -> None:
        """The start-up models; a worker in explicit mode loads the set its siblings serve now, if changed."""
        recorded = None
        if self.settings.peer_dir is not None and self.settings.model_control_mode == "explicit":
            recorded = workers.read_models(self.settings.peer_dir)
        if recorded is None:
            await self.registry.load_all(self._startup_models())
            return
        for name, data in recorded.items():
            try:
                await self.registry.load(name, decode_override(data))
            except ServerError as exc:
                logger.error("model '%s' not loaded: %s", name, exc)

    def _startup_models(self) -> list[str] | None:
        """Models to load at start: all of them, except in explicit mode (--load-model)."""
        if self.settings.model_control_mode != "explicit":
            return None
        if "*" in self.settings.load_model:
            return None
        return list(self.settings.load_model)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _schedule_health(self) -> None:
        if self.state.started:
            self._spawn(self._publish_health())

    async def _release_grpc_threads(self) -> None:
        # Now, and again every few seconds: gRPC's event engine grows its pool under load, sometimes from a
        # pinned thread whose mask the new thread inherits (a few small /proc reads each time).
        while True:
            cpus.release_named_threads()
            await asyncio.sleep(GRPC_THREADS_RESCAN_S)

    async def _poll_repository(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.registry.poll()
            except Exception:  # a scan that fails must not end polling
                logger.exception("repository poll failed")

    async def _publish_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        ready = self.plane.ready()
        await self.health.set("", serving if ready else not_serving)
        await self.health.set(INFERENCE_SERVICE, serving if ready else not_serving)
        for entry in self.registry.entries():
            # is_ready, not the entry's state: an ensemble whose step model is gone is not serving.
            await self.health.set(entry.name, serving if self.registry.is_ready(entry.name) else not_serving)

    async def stop(self) -> None:
        """Stops taking work, lets in-flight requests finish within the grace period, unloads."""
        if self._server is None:
            return
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        logger.info("shutting down: waiting up to %.1fs for in-flight requests", self.settings.shutdown_grace_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace_s
        # Drain with the gRPC server still running: meanwhile new requests get UNAVAILABLE from
        # our handlers, where a gRPC server that is stopping would cancel them (CANCELLED).
        while loop.time() < deadline and any(getattr(m, "busy", False) for m in self.registry.models()):
            await asyncio.sleep(DRAIN_POLL_S)
        # Both front ends stop together: requests and streams in flight keep the rest of the grace.
        remaining = max(0.0, deadline - loop.time())
        http = [s.stop(remaining) for s in (self._http, self._metrics) if s is not None]
        await asyncio.gather(self._server.stop(remaining), *http)
        self._http = self._metrics = None
        await self._server.wait_for_termination()
        self._server = None
        for task in list(self._background):
            task.cancel()
        await self.plane.close()
        await self.registry.close()
        logger.info("stopped")

    def reload(self) -> None:
        """SIGHUP: re-reads the auth config (a bad file is logged and the current one stays)."""
        if self.authenticator is None:
            logger.info("SIGHUP: nothing to reload (no --auth-config; TLS files are watched on their own)")
            return
        self.authenticator.reload()

    async def wait(self) -> None:
        """Waits until the gRPC server ends."""
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Runs the server until SIGTERM or SIGINT, then shuts down gracefully."""
    server = OrtServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await server.start()
    await stop.wait()
    await server.stop()
    # Stopped: what is left is the interpreter's exit. A second SIGTERM or Ctrl-C now (a supervisor repeating
    # its request) must not turn a clean stop into death by signal once the loop's handlers are gone.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
