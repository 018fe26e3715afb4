"""Several replicas on one machine (issue 16, part 8): three ortserve processes behind nginx, and client-side
load balancing without it.

Behind nginx (deploy/nginx/ortserve.conf, its ports swapped for free ones): requests spread round robin; a rolling
restart (SIGTERM, exit 0, start again, ready, next) under continuous load fails no request; SIGKILL fails at most
the requests in flight on the killed replica. Who retries: nginx passes a request to the next replica when one
refuses connections (down), answers HTTP 503 (draining) or drops a buffered HTTP request (killed). A draining
replica's gRPC UNAVAILABLE travels in an HTTP 200 response that nginx cannot judge, and nginx cannot resend a gRPC
call (never buffered) that a killed replica dropped: it answers UNAVAILABLE itself (the example's error_page). The
gRPC client's retry policy (RETRY_SERVICE_CONFIG) retries both; the HTTP client rarely has anything left to retry.

Without nginx: a `round_robin` channel over an `ipv4:` list spreads calls, and picks up a listed replica that
started later. A channel to one address in front of several replicas (a TCP balancer, as a Kubernetes Service is)
keeps its one connection, so one replica, for ever; `--grpc-max-connection-age-s` makes it reconnect, so a new
replica gets a share.

Every count is what the replicas report (ModelStatistics on each replica directly), never a guess.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.conftest import ROOT, ServerProcess

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

@pytest.fixture(autouse=True)
def _nginx_installed() -> None:
    # Not a skip: the set-up installs nginx, and a suite that silently skipped these would prove nothing.
    assert NGINX is not None, "nginx is not installed: run scripts/setup.sh (it installs Debian's nginx)"

EXAMPLE_CONFIG = ROOT / "deploy" / "nginx" / "ortserve.conf"
REPOSITORY = ROOT / "model_repository"
MODEL = "digits"
# Only the one model: quicker starts and restarts.
SERVER_ARGS = ("--model-control-mode", "explicit", "--load-model", MODEL)
REPLICAS = 3
# Client threads per protocol while replicas restart or die: the bound on requests in flight on one replica.
CLIENTS = 2
REQUESTS = 300
WAIT_S = 120.0

# What the README shows: retry UNAVAILABLE (a draining replica, or no replica reachable) with backoff, and
# CANCELLED: a call that reaches a replica just as its gRPC server stops, before its handler took it, is answered
# CANCELLED by gRPC itself (grpc/grpc issue 41785, grpcio 1.85), seen here about once in ten restarts. A client's
# own cancellations are never retried, and inference is safe to run again.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": "inference.GRPCInferenceService"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        },
    }],
}
RETRY_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]
ROUND_ROBIN_OPTIONS = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
# What an HTTP client retries, with backoff: a draining replica (503) that nginx did not retry itself, and
# nginx's own answers when no replica could take the request (502, 504).
HTTP_RETRY_STATUSES = {502, 503, 504}
HTTP_ATTEMPTS = 5


# ---------------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Polls an observable condition; fails with `what` if it does not hold within the (generous) timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def digits_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
    return request


DIGITS_JSON = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}


def check_grpc_answer(response: pb.ModelInferResponse) -> None:
    assert response.model_name == MODEL and len(response.raw_output_contents) == 2


class Replica:
    """One ortserve process that can be stopped, killed and started again on the same ports."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = (), grpc_port: int = 0) -> None:
        self.workdir = workdir
        self.extra = extra
        self.starts = 0
        self.server: ServerProcess | None = None
        self.ports = ("--port", str(grpc_port)) if grpc_port else ()

    def start(self) -> None:
        """Starts (again); returns once the models are loaded and every port listens (the port file)."""
        self.starts += 1
        rundir = self.workdir / f"run{self.starts}"
        rundir.mkdir(parents=True)
        self.server = ServerProcess(REPOSITORY, rundir, *SERVER_ARGS, *self.extra, *self.ports)
        if not self.ports[2:]:  # later starts reuse the first start's ports
            s = self.server
            self.ports = ("--port", str(s.port), "--http-port", str(s.http_port), "--metrics-port", str(s.metrics_port))
        assert httpx.get(f"{self.server.http_url}/v2/health/ready", timeout=30).status_code == 200

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    @property
    def http_address(self) -> str:
        assert self.server is not None
        return self.server.http_address

    def terminate(self) -> int:
        """SIGTERM and wait: the exit code."""
        assert self.server is not None
        return self.server.stop(timeout_s=WAIT_S)

    def kill(self) -> None:
        assert self.server is not None
        self.server.process.send_signal(signal.SIGKILL)
        self.server.stop(timeout_s=WAIT_S)

    def successes(self) -> int:
        """Successful inference requests this run of the replica counted (ModelStatistics, asked directly)."""
        with grpc.insecure_channel(self.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=30)
        return sum(s.inference_stats.success.count for s in stats.model_stats)

    def log(self) -> str:
        return self.server.log() if self.server is not None else ""


def counts(replicas: list[Replica]) -> list[int]:
    return [r.successes() for r in replicas]


def assert_even(before: list[int], after: list[int], total: int) -> None:
    """Every replica served within 20% of an even share of `total` requests, and none was lost."""
    spread = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(spread) == total, spread
    share = total / len(spread)
    assert all(0.8 * share <= n <= 1.2 * share for n in spread), spread


# ------------------------------------------------------------------------------------------------------ nginx


class Nginx:
    """deploy/nginx/ortserve.conf in a top-level config of its own, run in the foreground on free ports.

    The replicas' example ports become theirs; pid file, logs and temporary files live in `workdir`.
    The access log records, per request, nginx's status, each upstream it tried and the gRPC status it sent.
    """

    def __init__(self, workdir: Path, replicas: list[Replica]) -> None:
        self.workdir = workdir
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        config = workdir / "nginx.conf"
        config.write_text(self._config(replicas))
        command = [str(NGINX), "-p", str(workdir), "-c", str(config), "-e", str(self.error_log), "-g", "daemon off;"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self._accepts, "nginx to accept connections")

    def _config(self, replicas: list[Replica]) -> str:
        example = EXAMPLE_CONFIG.read_text()
        ports = {"8000": str(self.http_port), "8001": str(self.grpc_port)}
        for index, replica in enumerate(replicas):
            assert replica.server is not None
            ports[f"8{index + 1}00"] = str(replica.server.http_port)
            ports[f"8{index + 1}01"] = str(replica.server.port)
        site = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports[m.group(1)]}", example)
        site = re.sub(r"listen (\d+)", lambda m: f"listen 127.0.0.1:{ports[m.group(1)]}", site)
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temp = "\n".join(f"    {kind}_temp_path {self.workdir / kind};" for kind in kinds)
        # As root, nginx's workers would run as nobody, who cannot write into this test's directory.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        return f"""
{user}
worker_processes 1;
pid {self.workdir / "nginx.pid"};
error_log {self.error_log} info;
events {{ worker_connections 512; }}
http {{
    log_format replicas '$status "$upstream_addr" "$upstream_status" "$sent_http_grpc_status$sent_trailer_grpc_status"';
    access_log {self.access_log} replicas;
{temp}
{site}
}}
"""

    def _accepts(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.error_log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.grpc_port), timeout=1):
                pass
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def retries(self) -> Counter[str]:
        """From the access log: requests nginx passed to more than one replica (nginx retried), and answers
        other than success that reached the clients (theirs to retry): gRPC statuses and HTTP errors."""
        tally: Counter[str] = Counter()
        for line in self.access_log.read_text().splitlines():
            status, upstreams, _, grpc_status = (a or b for a, b in re.findall(r'^(\d+)|"([^"]*)"', line))
            if "," in upstreams:
                tally["nginx passed to another replica"] += 1
            grpc_status = grpc_status.strip("-")
            if grpc_status not in ("", "0"):
                tally[f"gRPC status {grpc_status} to a client"] += 1
            elif status != "200":
                tally[f"HTTP {status} to a client"] += 1
        return tally

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
        try:
            self.process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ------------------------------------------------------------------------------------------------------- load


class Load:
    """Client threads sending continuously through nginx, gRPC (retry policy) and HTTP (retries 502/503/504).

    Each request is counted under the phase that was current when it was sent, as "ok" or "failed"; a request
    that needed retries is one request.
    """

    def __init__(self, nginx: Nginx, clients: int = CLIENTS) -> None:
        self.nginx = nginx
        self.phase = "start"
        self.tally: Counter[tuple[str, str, str]] = Counter()
        self.errors: list[str] = []
        self.http_retries = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._grpc_client, daemon=True) for _ in range(clients)]
        self._threads += [threading.Thread(target=self._http_client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _record(self, protocol: str, phase: str, error: str | None) -> None:
        with self._lock:
            self.tally[(protocol, phase, "failed" if error else "ok")] += 1
            if error:
                self.errors.append(f"{protocol} ({phase}): {error}")

    def _grpc_client(self) -> None:
        with grpc.insecure_channel(self.nginx.grpc_address, options=RETRY_OPTIONS) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = digits_request()
            while not self._stop.is_set():
                phase, error = self.phase, None
                try:
                    check_grpc_answer(stub.ModelInfer(request, timeout=60))
                except grpc.RpcError as exc:
                    error = f"{exc.code()}: {exc.details()}"
                self._record("grpc", phase, error)

    def _http_client(self) -> None:
        with httpx.Client(base_url=self.nginx.http_url, timeout=60) as client:
            while not self._stop.is_set():
                phase = self.phase
                self._record("http", phase, self._http_infer(client))

    def _http_infer(self, client: httpx.Client) -> str | None:
        """One inference request, retried with backoff on 502/503/504 and on connection errors; None if it
        succeeded, else why not."""
        error = "no attempt"
        for attempt in range(HTTP_ATTEMPTS):
            if attempt:
                with self._lock:
                    self.http_retries += 1
                time.sleep(min(1.0, 0.1 * 2 ** (attempt - 1)))  # backoff between attempts, not a wait for state
            try:
                response = client.post(f"/v2/models/{MODEL}/infer", json=DIGITS_JSON)
            except httpx.TransportError as exc:
                error = repr(exc)
                continue
            if response.status_code == 200 and len(response.json()["outputs"]) == 2:
                return None
            error = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code not in HTTP_RETRY_STATUSES:
                return error
        return error

    def ok(self, protocol: str, phase: str) -> int:
        with self._lock:
            return self.tally[(protocol, phase, "ok")]

    def failed(self, phase: str) -> int:
        with self._lock:
            return sum(n for (_, p, outcome), n in self.tally.items() if p == phase and outcome == "failed")

    def enter(self, phase: str, min_ok: int = 5) -> None:
        """Starts a phase; returns once each protocol had `min_ok` successes in it."""
        self.phase = phase
        wait_until(lambda: min(self.ok("grpc", phase), self.ok("http", phase)) >= min_ok, f"requests in {phase}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=WAIT_S)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    started = [Replica(tmp_path_factory.mktemp(f"replica{i}")) for i in range(REPLICAS)]
    try:
        for replica in started:
            replica.start()
        yield started
    finally:
        for replica in started:
            if replica.server is not None:
                replica.terminate()


@pytest.fixture(scope="module")
def nginx(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), replicas)
    yield proxy
    proxy.stop()


def restart(replica: Replica, replicas: list[Replica], load: Load, phase: str) -> None:
    """Starts a replica again; returns once nginx sends it traffic again (its own count moves)."""
    replica.start()
    wait_until(lambda: replica.successes() > 0, f"{phase}: the restarted replica to get requests through nginx")
    assert all(r.server is not None and r.server.process.poll() is None for r in replicas)
    assert load.failed(phase) == 0, load.errors


# ------------------------------------------------------------------------------------------------ nginx tests


def test_nginx_spreads_requests_round_robin(nginx: Nginx, replicas: list[Replica]) -> None:
    """One gRPC channel and one HTTP connection through nginx: nginx balances each request, not connections."""
    before = counts(replicas)
    with grpc.insecure_channel(nginx.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = digits_request()
        for _ in range(REQUESTS):
            check_grpc_answer(stub.ModelInfer(request, timeout=60))
    middle = counts(replicas)
    assert_even(before, middle, REQUESTS)
    with httpx.Client(base_url=nginx.http_url, timeout=60) as client:
        for _ in range(REQUESTS):
            response = client.post(f"/v2/models/{MODEL}/infer", json=DIGITS_JSON)
            assert response.status_code == 200, response.text
    assert_even(middle, counts(replicas), REQUESTS)


def test_rolling_restart_under_load_fails_no_request(nginx: Nginx, replicas: list[Replica]) -> None:
    """SIGTERM one replica at a time, start it again, wait until it serves, next: zero failed requests."""
    load = Load(nginx)
    try:
        load.enter("steady")
        for index, replica in enumerate(replicas):
            phase = f"restart {index}"
            load.phase = phase
            code = replica.terminate()
            assert code == 0, f"replica {index} exited with {code}:\n{replica.log()}"
            load.enter(phase)  # requests keep flowing while the replica is gone
            restart(replica, replicas, load, phase)
        load.enter("after")
    finally:
        load.stop()
    phases = ["steady", *(f"restart {i}" for i in range(len(replicas))), "after"]
    print("requests per phase:", {p: (load.ok("grpc", p), load.ok("http", p)) for p in phases})
    print("retries:", dict(nginx.retries()), "HTTP client retries:", load.http_retries)
    assert not load.errors, load.errors[:10]
    for phase in phases:
        assert load.ok("grpc", phase) > 0 and load.ok("http", phase) > 0, phase


def test_sigkill_fails_at_most_the_requests_in_flight(nginx: Nginx, replicas: list[Replica]) -> None:
    """SIGKILL one replica under load: only requests in flight then may fail; afterwards every request succeeds."""
    load = Load(nginx)
    victim = replicas[0]
    try:
        load.enter("steady")
        # Requests sent from here on may be in flight on the victim when it dies.
        load.enter("kill", min_ok=0)
        victim.kill()
        load.enter("killed")
        restart(victim, replicas, load, "killed")
        load.enter("after")
    finally:
        load.stop()
    print("failed when killed:", load.failed("kill"), "retries:", dict(nginx.retries()), load.errors)
    # At most one request in flight per client thread; with retries (nginx's and the clients') usually none.
    assert load.failed("kill") <= 2 * CLIENTS, load.errors
    assert load.failed("steady") == load.failed("killed") == load.failed("after") == 0, load.errors


# ------------------------------------------------------------------------------- client-side load balancing


def test_round_robin_channel_spreads_calls(replicas: list[Replica]) -> None:
    """A `round_robin` channel over an ipv4: list of the replicas spreads calls within 20% of even."""
    target = "ipv4:" + ",".join(r.address for r in replicas)
    with grpc.insecure_channel(target, options=ROUND_ROBIN_OPTIONS) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = digits_request()
        start = counts(replicas)

        # round_robin uses the replicas it is connected to: first until every one has answered.
        def all_connected() -> bool:
            check_grpc_answer(stub.ModelInfer(request, timeout=60))
            return all(n > s for n, s in zip(counts(replicas), start, strict=True))

        wait_until(all_connected, "the round_robin channel to reach every replica")
        before = counts(replicas)
        for _ in range(REQUESTS):
            check_grpc_answer(stub.ModelInfer(request, timeout=60))
        assert_even(before, counts(replicas), REQUESTS)


def test_round_robin_channel_picks_up_a_replica_started_later(
    replicas: list[Replica], tmp_path: Path,
) -> None:
    """A listed address that had no replica when the channel was made gets calls once one starts there:
    round_robin keeps reconnecting to every address in its list."""
    late = Replica(tmp_path / "late", grpc_port=free_port())
    target = "ipv4:" + ",".join([replicas[0].address, replicas[1].address, f"127.0.0.1:{late.ports[1]}"])
    with grpc.insecure_channel(target, options=ROUND_ROBIN_OPTIONS) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = digits_request()
        for _ in range(10):
            check_grpc_answer(stub.ModelInfer(request, timeout=60))
        late.start()
        try:
            def late_served() -> bool:
                check_grpc_answer(stub.ModelInfer(request, timeout=60))
                return late.successes() > 0

            wait_until(late_served, "the replica started later to get calls")
        finally:
            assert late.terminate() == 0, late.log()


class TcpBalancer:
    """A TCP (layer 4) balancer on one address: each new connection goes to the next replica that accepts it,
    as a Kubernetes Service's virtual IP does. A gRPC channel to it holds one connection, so one replica."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.connections = 0
        self.port = free_port()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._closing: asyncio.Event | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(started),))
        self._thread.start()
        started.wait(WAIT_S)

    async def _serve(self, started: threading.Event) -> None:
        self._closing = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        started.set()
        async with server:
            await self._closing.wait()
            server.close()
            for writer in list(self._writers):
                writer.close()
        # Let the pipes see their sockets closed and end.
        while self._writers:
            await asyncio.sleep(0.01)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            for _ in self.backends:
                port = self.backends[self.connections % len(self.backends)]
                self.connections += 1
                try:
                    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:  # nobody there (yet): the next replica
                    continue
                self._writers.add(upstream_writer)
                try:
                    await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
                finally:
                    self._writers.discard(upstream_writer)
                return
        finally:
            writer.close()
            self._writers.discard(writer)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        assert self._closing is not None
        self._loop.call_soon_threadsafe(self._closing.set)
        self._thread.join(timeout=WAIT_S)
        self._loop.close()


class Caller:
    """A thread sending calls on one channel continuously, as a long-lived client does, until stopped."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        request = digits_request()
        while not self._stop.is_set():
            try:
                check_grpc_answer(stub.ModelInfer(request, timeout=60))
                self.sent += 1
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code()}: {exc.details()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT_S)
        self.channel.close()
        assert not self.errors, self.errors[:10]


AGE_S = 2


def test_max_connection_age_rebalances_a_long_lived_channel(replicas: list[Replica], tmp_path: Path) -> None:
    """Through a TCP balancer, a busy channel made before a replica started reaches it once its connection ages
    out (--grpc-max-connection-age-s); without the option, all its calls stay on one replica."""
    age = ("--grpc-max-connection-age-s", str(AGE_S))
    first = Replica(tmp_path / "first", age)
    late = Replica(tmp_path / "late", age, grpc_port=free_port())
    first.start()
    assert first.server is not None
    balancer = TcpBalancer([first.server.port, int(late.ports[1])])
    began = time.monotonic()
    caller = Caller(balancer.address)
    try:
        wait_until(lambda: first.successes() > 0, "the first replica to get calls")
        late.start()
        wait_until(lambda: late.successes() > 0, "the replica started later to get calls")
        took = time.monotonic() - began
    finally:
        caller.stop()
        balancer.close()
        codes = [first.terminate(), late.terminate() if late.server else 0]
        assert codes == [0, 0], first.log() + late.log()
    print(f"with the option: the late replica had calls after {caller.sent} calls, {balancer.connections} connections")
    assert balancer.connections >= 2  # the channel reconnected: what moved it

    # Without the option (the module's replicas), the same: its one connection stays, and so do all its calls.
    balancer = TcpBalancer([r.server.port for r in replicas if r.server])
    before = counts(replicas)
    caller = Caller(balancer.address)
    try:
        # A window to compare with, not a wait for something to happen: at least as long as the run above and
        # a few connection ages, during which nothing may change.
        time.sleep(max(took, 3 * AGE_S))
    finally:
        caller.stop()
        balancer.close()
    spread = [b - a for a, b in zip(before, counts(replicas), strict=True)]
    print(f"without: {spread} over {balancer.connections} connection(s)")
    assert sum(spread) == caller.sent > 0
    assert sorted(spread)[:-1] == [0] * (len(replicas) - 1) and balancer.connections == 1, spread
