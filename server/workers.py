"""`--workers N`: N server processes share one port (SO_REUSEPORT), supervised by this process.

gRPC in Python spends most of a small request in its C core and the event loop, on
one thread; separate processes are what let a server use more than one core for
that work. Each worker loads every model and runs its own batchers. To still look
like one server, each worker also listens on a private Unix socket in a shared
directory, and answers ModelStatistics by adding up its peers' counters.

Model control (explicit mode) stays the same on every worker: a load or unload takes
an exclusive lock on a file in the shared directory, is applied to every worker, and
records the resulting set of models in `models.json` there; a worker that starts (or
is restarted after dying) holds the lock shared while it loads that set, so no
operation slips between what it read and the moment its peers can reach it.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.settings import Settings, worker_arguments

logger = logging.getLogger(__name__)

READY_SUFFIX = ".ready"
CONTROL_LOCK = "control.lock"
MODELS_FILE = "models.json"
# Restart backoff: a worker that keeps dying must not spin the machine; one that ran
# for a while before dying is restarted at once again.
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0
_LOCK_POLL_S = 0.01


def worker_socket(peer_dir: Path, index: int) -> Path:
    """The private Unix socket of worker `index`."""
    return peer_dir / f"worker-{index}.sock"


def peer_addresses(peer_dir: Path, own_index: int, count: int) -> list[str]:
    """gRPC addresses of the other workers' private sockets."""
    return [f"unix:{worker_socket(peer_dir, i)}" for i in range(count) if i != own_index]


async def lock_control(peer_dir: Path, exclusive: bool) -> int:
    """Takes the model-control lock shared by every worker; returns the fd that `unlock_control` releases.

    Exclusive for a load or unload, shared for a starting worker (several may start at once).
    It polls instead of blocking a thread so that a cancelled wait leaves nothing holding
    the lock; the kernel drops it if the holder dies.
    """
    fd = os.open(peer_dir / CONTROL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    try:
        while True:
            try:
                fcntl.flock(fd, mode)
                return fd
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL_S)
    except BaseException:
        os.close(fd)
        raise


def unlock_control(fd: int) -> None:
    """Releases a lock taken by `lock_control`."""
    os.close(fd)  # closing the only descriptor of this open file drops its flock


def read_models(peer_dir: Path) -> dict[str, bytes | None] | None:
    """The models every worker should have loaded, or None before any change.

    Returns:
        Model name -> its serialized config override (a ModelConfig), None when it loads its own config.
    """
    try:
        data = json.loads((peer_dir / MODELS_FILE).read_text())
    except FileNotFoundError:
        return None
    return {name: None if value is None else base64.b64decode(value) for name, value in data["models"].items()}


def write_models(peer_dir: Path, models: dict[str, bytes | None]) -> None:
    """Records the current set of models, atomically (a reader never sees half a file)."""
    data = {
        "models": {
            name: None if value is None else base64.b64encode(value).decode("ascii")
            for name, value in sorted(models.items())
        }
    }
    tmp = peer_dir / f"{MODELS_FILE}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, peer_dir / MODELS_FILE)


def metrics_file(peer_dir: Path, index: int) -> Path:
    """Where worker `index` keeps its cumulative metric families, for the worker that replaces it."""
    return peer_dir / f"worker-{index}.metrics.json"


def write_json_atomically(path: Path, data: bytes) -> None:
    """Replaces a file so that a reader sees the old or the new content, never half of one."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Binds (without listening) so a port-0 request becomes a concrete port the workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker_command(
    settings: Settings, port: int, index: int, peer_dir: Path, http_port: int = 0, metrics_port: int = 0
) -> list[str]:
    flags = worker_arguments(
        settings, port=port, http_port=http_port, metrics_port=metrics_port, worker_index=index, peer_dir=peer_dir
    )
    return [sys.executable, "-m", "server", "serve", *flags]


def describe_exit(code: int) -> str:
    """'code 1' or 'signal 9 (SIGKILL)' for a Popen return code."""
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class _Worker:
    """One worker slot: its process, and when to restart it after it died."""

    index: int
    process: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)
    backoff_s: float = RESTART_BACKOFF_MIN_S
    restart_at: float | None = None


class _Supervisor:
    """Starts the workers, restarts any that dies, stops them all on SIGTERM/SIGINT."""

    def __init__(
        self, settings: Settings, port: int, peer_dir: Path, http_port: int = 0, metrics_port: int = 0
    ) -> None:
        self.settings = settings
        self.port = port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.peer_dir = peer_dir
        self.workers: list[_Worker] = []

    def spawn(self, index: int) -> subprocess.Popen[bytes]:
        # A dead worker leaves its ready mark and socket behind; the new one makes its own.
        (self.peer_dir / f"worker-{index}{READY_SUFFIX}").unlink(missing_ok=True)
        worker_socket(self.peer_dir, index).unlink(missing_ok=True)
        command = _worker_command(self.settings, self.port, index, self.peer_dir, self.http_port, self.metrics_port)
        return subprocess.Popen(command)

    def start_all(self) -> None:
        self.workers = [_Worker(i, self.spawn(i)) for i in range(self.settings.workers)]

    def all_ready(self) -> bool:
        return all((self.peer_dir / f"worker-{w.index}{READY_SUFFIX}").exists() for w in self.workers)

    def first_dead(self) -> _Worker | None:
        return next((w for w in self.workers if w.restart_at is None and w.process.poll() is not None), None)

    def tend(self) -> None:
        """One supervision pass: schedule restarts of dead workers, start those whose backoff is over."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is None and worker.process.poll() is not None:
                if now - worker.started_at >= STABLE_AFTER_S:
                    worker.backoff_s = RESTART_BACKOFF_MIN_S
                worker.restart_at = now + worker.backoff_s
                logger.error(
                    "worker %d exited with %s; restarting in %.1f s (pid was %d)",
                    worker.index, describe_exit(worker.process.returncode), worker.backoff_s, worker.process.pid,
                )
                worker.backoff_s = min(worker.backoff_s * 2, RESTART_BACKOFF_MAX_S)
            elif worker.restart_at is not None and now >= worker.restart_at:
                worker.process = self.spawn(worker.index)
                worker.started_at, worker.restart_at = now, None
                logger.info("worker %d restarted (pid %d)", worker.index, worker.process.pid)

    def stop_all(self) -> list[int]:
        """SIGTERM to every running worker; waits for the grace period (plus slack), then kills."""
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
            elif worker.restart_at is None:
                # Died on its own before the stop request (it would have been restarted): that is
                # logged, and not what the exit code of a requested stop reports.
                logger.error("worker %d exited with %s", worker.index, describe_exit(worker.process.returncode))
                worker.restart_at = 0.0
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 30
        codes = []
        for worker in self.workers:
            if worker.restart_at is not None:
                continue  # died earlier and was never restarted: its code was logged then
            try:
                codes.append(worker.process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                codes.append(worker.process.wait())
        return codes


def supervise(settings: Settings) -> int:
    """Starts the workers, waits for them to be ready, restarts any that dies, forwards SIGTERM/SIGINT.

    Returns:
        The exit code: 0 after a requested stop where every worker exited cleanly, else 1.
    """
    reserved = _reserve_port(settings.host, settings.port)
    port = reserved.getsockname()[1]
    # The HTTP port too: every worker serves both, so port 0 must become one port they all share.
    reserved_http = _reserve_port(settings.host, settings.http_port) if settings.allow_http else None
    http_port = reserved_http.getsockname()[1] if reserved_http is not None else 0
    reserved_metrics = _reserve_port(settings.host, settings.metrics_port) if settings.allow_metrics else None
    metrics_port = reserved_metrics.getsockname()[1] if reserved_metrics is not None else 0
    peer_dir = Path(tempfile.mkdtemp(prefix="ortserve-"))
    stopping = False
    failed = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    supervisor = _Supervisor(settings, port, peer_dir, http_port, metrics_port)

    def reload(signum: int, frame: object) -> None:
        # SIGHUP re-reads the auth config: every worker holds its own copy.
        for worker in supervisor.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGHUP, reload)
    supervisor.start_all()
    try:
        while not stopping:
            if supervisor.all_ready():
                break
            # A worker that cannot even start (bad repository, port taken) will not do better on a retry.
            dead = supervisor.first_dead()
            if dead is not None:
                code = describe_exit(dead.process.returncode)
                logger.error("worker %d exited during start-up with %s", dead.index, code)
                failed = True
                break
            time.sleep(0.05)
        if not stopping and not failed:
            reserved.close()  # the workers hold the port now
            for extra in (reserved_http, reserved_metrics):
                if extra is not None:
                    extra.close()
            logger.info("ortserve listening on %s:%d with %d workers", settings.host, port, len(supervisor.workers))
            metrics_port_file = settings.metrics_port_file()
            if metrics_port_file is not None and reserved_metrics is not None:
                logger.info("ortserve metrics on %s:%d", settings.host, metrics_port)
                metrics_port_file.write_text(str(metrics_port))
            http_port_file = settings.http_port_file()
            if http_port_file is not None and reserved_http is not None:
                logger.info("ortserve HTTP on %s:%d", settings.host, http_port)
                http_port_file.write_text(str(http_port))  # before the gRPC one, which readers wait for
            if settings.port_file:
                settings.port_file.write_text(str(port))
        while not stopping and not failed:
            supervisor.tend()
            time.sleep(0.1)
        codes = supervisor.stop_all()
        return 0 if stopping and not failed and all(c == 0 for c in codes) else 1
    finally:
        for sock in (reserved, reserved_http, reserved_metrics):
            if sock is not None:
                sock.close()
        shutil.rmtree(peer_dir, ignore_errors=True)


def mark_ready(peer_dir: Path, index: int) -> None:
    """Tells the supervisor this worker is serving."""
    path = peer_dir / f"worker-{index}{READY_SUFFIX}"
    path.write_text(str(os.getpid()))
