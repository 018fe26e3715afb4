"""`--workers N`: N server processes share one port (SO_REUSEPORT), supervised by this process.

gRPC in Python spends most of a small request in its C core and the event loop, on
one thread; separate processes are what let a server use more than one core for
that work. Each worker loads every model and runs its own batchers. To still look
like one server, each worker also listens on a private Unix socket in a shared
directory, and answers ModelStatistics by adding up its peers' counters.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.settings import Settings

logger = logging.getLogger(__name__)

READY_SUFFIX = ".ready"


def worker_socket(peer_dir: Path, index: int) -> Path:
    """The private Unix socket of worker `index`."""
    return peer_dir / f"worker-{index}.sock"


def peer_addresses(peer_dir: Path, own_index: int, count: int) -> list[str]:
    """gRPC addresses of the other workers' private sockets."""
    return [f"unix:{worker_socket(peer_dir, i)}" for i in range(count) if i != own_index]


def _reserve_port(host: str, port: int) -> socket.socket:
    """Binds (without listening) so a port-0 request becomes a concrete port the workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_command(settings: Settings, port: int, index: int, peer_dir: Path) -> list[str]:
    args = [
        sys.executable, "-m", "server", "serve",
        "--model-repository", str(settings.model_repository),
        "--host", settings.host, "--port", str(port), "--device", settings.device,
        "--max-receive-message-bytes", str(settings.max_receive_message_bytes),
        "--default-max-batch-size", str(settings.default_max_batch_size),
        "--strict-readiness", "true" if settings.strict_readiness else "false",
        "--shutdown-grace-s", str(settings.shutdown_grace_s),
        "--log-level", settings.log_level, "--event-loop", settings.event_loop,
        "--workers", str(settings.workers), "--worker-index", str(index), "--peer-dir", str(peer_dir),
        "--model-control-mode", settings.model_control_mode,
        "--repository-poll-secs", str(settings.repository_poll_secs),
    ]
    for name in settings.load_model:
        args += ["--load-model", name]
    return args


def supervise(settings: Settings) -> int:
    """Starts the workers, waits for them to be ready, forwards SIGTERM/SIGINT, returns the exit code."""
    reserved = _reserve_port(settings.host, settings.port)
    port = reserved.getsockname()[1]
    peer_dir = Path(tempfile.mkdtemp(prefix="ortserve-"))
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = [
        subprocess.Popen(_worker_command(settings, port, i, peer_dir), start_new_session=False)
        for i in range(settings.workers)
    ]
    try:
        while not stopping:
            ready = all((peer_dir / f"worker-{i}{READY_SUFFIX}").exists() for i in range(len(workers)))
            if ready:
                break
            dead = [w for w in workers if w.poll() is not None]
            if dead:
                logger.error("a worker exited during start-up (code %s)", dead[0].returncode)
                stopping = True
                break
            time.sleep(0.05)
        if not stopping:
            reserved.close()  # the workers hold the port now
            logger.info("ortserve listening on %s:%d with %d workers", settings.host, port, len(workers))
            if settings.port_file:
                settings.port_file.write_text(str(port))
        while not stopping:
            dead = [w for w in workers if w.poll() is not None]
            if dead:
                logger.error("worker pid %d exited with %s; stopping the others", dead[0].pid, dead[0].returncode)
                break
            time.sleep(0.2)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_s + 30
        codes = []
        for worker in workers:
            try:
                codes.append(worker.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                worker.kill()
                codes.append(worker.wait())
        return 0 if stopping and all(c == 0 for c in codes) else 1
    finally:
        reserved.close()
        shutil.rmtree(peer_dir, ignore_errors=True)


def mark_ready(peer_dir: Path, index: int) -> None:
    """Tells the supervisor this worker is serving."""
    path = peer_dir / f"worker-{index}{READY_SUFFIX}"
    path.write_text(str(os.getpid()))
