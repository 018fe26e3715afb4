"""`--workers 2` under faults: racing model control, a killed worker, SIGTERM with requests in flight."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests import conftest
from tests.conftest import ServerProcess
from tests.gate import WAIT_S, wait_until

CONTROLLED = ["addsub", "suffix", "identity_fp32"]


def _fresh_stub(address: str) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    # A private subchannel pool: every channel is a new connection, which the kernel hands to either worker.
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _worker_of(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> str:
    _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=WAIT_S)
    return next(v for k, v in call.initial_metadata() if k == "ortserve-worker")


def _per_worker(address: str, count: int = 2) -> Iterator[tuple[str, service_pb2_grpc.GRPCInferenceServiceStub]]:
    """Yields (worker index, stub on a connection to it) once for each worker.

    Opens fresh connections until every worker was seen.
    """
    seen: set[str] = set()
    for _ in range(400):
        channel, stub = _fresh_stub(address)
        with channel:
            worker = _worker_of(stub)
            if worker not in seen:
                seen.add(worker)
                yield worker, stub
        if len(seen) == count:
            return
    raise AssertionError(f"only workers {sorted(seen)} took connections")


def _ready_set(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> tuple[frozenset[str], frozenset[str]]:
    """(models ModelReady says are ready, models RepositoryIndex lists READY) among CONTROLLED."""
    ready = {m for m in CONTROLLED if stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=WAIT_S).ready}
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=WAIT_S)
    return frozenset(ready), frozenset(m.name for m in index.models if m.name in CONTROLLED)


def _views(address: str) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    return {worker: _ready_set(stub) for worker, stub in _per_worker(address)}


def _explicit_server(repository: conftest.TestRepository, tmp_path: Path, *extra: str) -> ServerProcess:
    return ServerProcess(
        repository.path, tmp_path, "--workers", "2", "--model-control-mode", "explicit",
        "--load-model", "addsub", "--strict-readiness", "false", *extra,
    )


def test_concurrent_load_unload_storm_leaves_every_worker_agreeing(repository, tmp_path: Path) -> None:
    server = _explicit_server(repository, tmp_path)
    failures: list[BaseException] = []
    codes: list[grpc.StatusCode] = []

    def storm(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(8):
                channel, stub = _fresh_stub(server.address)
                with channel:
                    name = rng.choice(CONTROLLED)
                    try:
                        if rng.random() < 0.5:
                            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=WAIT_S)
                        else:
                            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=WAIT_S)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as exc:
                        codes.append(exc.code())
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    try:
        threads = [threading.Thread(target=storm, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=4 * WAIT_S)
        assert not failures, failures
        assert len(codes) == 32
        # Unloading a model that is not loaded is NOT_FOUND; nothing else may fail.
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}, codes
        for _ in range(5):  # each round asks both workers again, on new connections
            views = _views(server.address)
            assert len(set(views.values())) == 1, views
            ready, listed = next(iter(views.values()))
            assert ready == listed
    finally:
        assert server.stop() == 0, server.log()


def test_unloading_a_model_that_is_not_loaded_is_not_found_on_every_worker(repository, tmp_path: Path) -> None:
    server = _explicit_server(repository, tmp_path)
    try:
        for _ in range(4):  # lands on either worker; the answer is the same
            channel, stub = _fresh_stub(server.address)
            with channel, pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="suffix"), timeout=WAIT_S)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
        channel, stub = _fresh_stub(server.address)
        with channel:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="addsub"), timeout=WAIT_S)
        assert {v[0] for v in _views(server.address).values()} == {frozenset()}
    finally:
        assert server.stop() == 0, server.log()


def test_peer_header_on_the_public_port_acts_on_every_worker(repository, tmp_path: Path) -> None:
    server = _explicit_server(repository, tmp_path)
    header = (("ortserve-peer-local", "1"),)
    try:
        channel, stub = _fresh_stub(server.address)
        with channel:
            stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="addsub"), metadata=header, timeout=WAIT_S
            )
        views = _views(server.address)
        assert all("addsub" not in ready for ready, _ in views.values()), views
        channel, stub = _fresh_stub(server.address)
        with channel:
            stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="suffix"), metadata=header, timeout=WAIT_S
            )
            # Statistics asked with the header on the public port still add up every worker.
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="suffix"), metadata=header, timeout=WAIT_S)
            assert len(stats.model_stats) == 1
        views = _views(server.address)
        assert all(ready == {"suffix"} for ready, _ in views.values()), views
    finally:
        assert server.stop() == 0, server.log()


def _addsub_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="addsub")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[4])
        request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return request


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _worker_pid(server: ServerProcess, index: int) -> int:
    pids = re.findall(rf"worker {index} \(pid (\d+)\) serving", server.log())
    return int(pids[-1])


def test_a_killed_worker_is_restarted_with_the_current_models_while_the_other_serves(
    repository, tmp_path: Path
) -> None:
    server = _explicit_server(repository, tmp_path, "--load-model", "identity_fp32")
    try:
        channel, stub = _fresh_stub(server.address)
        with channel:
            # The set the restarted worker must load: changed through the API since start.
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="suffix"), timeout=WAIT_S)
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="identity_fp32"), timeout=WAIT_S)
        workers = _children(server.process.pid)
        assert len(workers) == 2
        victim = _worker_pid(server, 1)
        assert victim in workers
        os.kill(victim, signal.SIGKILL)
        # Logged once the supervisor has reaped it: every thread is gone, so is its listening socket.
        # (Connections the kernel had queued on that socket when it died are reset: those are
        # the in-flight ones a client may see fail.)
        restarting = "worker 1 exited with signal 9 (SIGKILL); restarting"
        wait_until(lambda: restarting in server.log(), "the restart log line")
        for _ in range(40):  # new connections reach the surviving worker (or the restarted one)
            channel, stub = _fresh_stub(server.address)
            with channel:
                response = stub.ModelInfer(_addsub_request(), timeout=WAIT_S)
                # The survivor answers statistics with what it can reach (its peer is down).
                stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="addsub"), timeout=WAIT_S)
            assert list(np.frombuffer(response.raw_output_contents[0], np.float32)) == [2.0] * 4
            assert len(stats.model_stats) == 1
        wait_until(lambda: _worker_pid(server, 1) != victim, "worker 1 to serve again")
        assert len(_children(server.process.pid)) == 2
        views = _views(server.address)
        assert views == {w: (frozenset({"addsub", "suffix"}),) * 2 for w in ("0", "1")}, views
        # Model control reaches the restarted worker again, whichever worker takes the call.
        for worker, stub in _per_worker(server.address):
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="identity_fp32"), timeout=WAIT_S)
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="identity_fp32"), timeout=WAIT_S)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="identity_fp32"), timeout=WAIT_S)
            views = _views(server.address)
            assert views == {w: (frozenset(CONTROLLED),) * 2 for w in ("0", "1")}, (worker, views)
        for worker, stub in _per_worker(server.address):
            stub.ModelInfer(_addsub_request(), timeout=WAIT_S)
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="addsub"), timeout=WAIT_S).model_stats
            assert len(stats) == 1 and stats[0].inference_stats.success.count >= 40, (worker, stats)
    finally:
        assert server.stop() == 0, server.log()


def _gated_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="gated")
    request.inputs.add(name="x", datatype="FP32", shape=[256, 512])
    request.raw_input_contents.append(np.full((256, 512), 0.01, np.float32).tobytes())
    return request


def _unavailable(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status of a request that a draining server must refuse."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("attempt", range(5))
def test_sigterm_with_requests_in_flight_on_both_workers_finishes_them(
    repository, tmp_path: Path, attempt: int
) -> None:
    small = tmp_path / "repo"
    for name in ("gated", "addsub"):  # gated's config points at the shared gate directory
        shutil.copytree(repository.path / name, small / name)
    gate = repository.gates["gated"]
    server = ServerProcess(small, tmp_path, "--workers", "2", "--strict-readiness", "false")
    channels: list[grpc.Channel] = []
    try:
        with gate.held():
            stubs = {}
            while len(stubs) < 2:  # one open connection to each worker
                channel, stub = _fresh_stub(server.address)
                channels.append(channel)
                stubs.setdefault(_worker_of(stub), stub)
            seen = len(gate.entered())
            unary = stubs["0"].ModelInfer.future(_gated_request(), timeout=WAIT_S)
            stream = stubs["1"].ModelStreamInfer(iter([_gated_request()]), timeout=WAIT_S)
            wait_until(lambda: len(gate.entered()) >= seen + 2, "a run held on each worker")
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: server.log().count("shutting down") == 2, "both workers to start draining")
            for stub in stubs.values():
                # The drain runs with the server still up: probes get an answer (not ready), not an error.
                assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=WAIT_S).ready
                # New work on a connection that is still open, while the held requests drain.
                code = _unavailable(lambda stub=stub: stub.ModelInfer(_addsub_request(), timeout=WAIT_S))
                assert code == grpc.StatusCode.UNAVAILABLE
                new_stream = stub.ModelStreamInfer(iter([_addsub_request()]), timeout=WAIT_S)
                assert _unavailable(lambda new_stream=new_stream: list(new_stream)) == grpc.StatusCode.UNAVAILABLE
        # The gate is open again: the held runs finish, and every byte of their answers arrives.
        responses = [unary.result(), *(r.infer_response for r in stream)]
        for response in responses:
            assert len(response.raw_output_contents[0]) == 256 * 512 * 4
        assert server.process.wait(timeout=WAIT_S) == 0, server.log()
    finally:
        for channel in channels:
            channel.close()
        server.stop()


class _FakeRegistry:
    """Just what model control touches: which models are ready, and a log of loads and unloads."""

    def __init__(self, ready: set[str], fail_load: bool = False) -> None:
        self.ready = set(ready)
        self.fail_load = fail_load
        self.calls: list[tuple[str, str, object]] = []
        self.repository = self

    def model_dir(self, name: str) -> Path:
        return Path(name)

    def is_ready(self, name: str, version: str = "") -> bool:
        return name in self.ready

    def entries(self) -> list[object]:
        return []

    async def load(self, name: str, override: object = None) -> None:
        self.calls.append(("load", name, override))
        if self.fail_load:
            from server.core.errors import ModelLoadError

            raise ModelLoadError(f"failed to load '{name}': out of memory")
        self.ready.add(name)

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name, None))
        self.ready.discard(name)


class _FakePeers:
    """One sibling whose answers are `results`, one per call, in order; records what was asked of it."""

    def __init__(self, results: list[object]) -> None:
        self.results = results
        self.sent: list[tuple[str, str, object]] = []

    def _answer(self, call: tuple[str, str, object]) -> bool:
        self.sent.append(call)
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return bool(result)

    async def statistics(self, address: str, name: str, version: str) -> None:
        return None

    async def load(self, address: str, name: str, config: object) -> bool:
        return self._answer(("load", name, config))

    async def unload(self, address: str, name: str) -> bool:
        return self._answer(("unload", name, None))

    async def close(self) -> None:
        pass


def _control(tmp_path: Path, registry: _FakeRegistry, peer_results: list[object]):  # type: ignore[no-untyped-def]
    """Model control over the fake registry, with one sibling answering `peer_results` (no gRPC involved)."""
    from server.service.control import ModelControl

    peers = _FakePeers(peer_results)
    return ModelControl(registry, peers, ["unix:sibling"], tmp_path, 0), peers.sent  # type: ignore[arg-type]


async def test_a_first_load_that_fails_on_one_worker_is_undone_on_the_others(tmp_path: Path) -> None:
    from server import workers
    from server.core.errors import InvalidInputError

    registry = _FakeRegistry({"addsub"})
    control, sent = _control(tmp_path, registry, [InvalidInputError("failed to load 'digits': no memory"), True])
    with pytest.raises(InvalidInputError, match="no memory"):
        await control.load("digits", None)
    assert registry.calls == [("load", "digits", None), ("unload", "digits", None)]
    assert "digits" not in registry.ready
    assert [call for call, _, _ in sent] == ["load"]  # the sibling never had it
    assert workers.read_models(tmp_path) is None  # the recorded set is unchanged


async def test_a_reload_that_fails_on_one_worker_brings_the_others_back_to_the_previous_config(tmp_path: Path) -> None:
    from server import workers
    from server.core.errors import ModelLoadError
    from server.schema import model_config_pb2 as mc

    previous = mc.ModelConfig(max_batch_size=4)
    workers.write_models(tmp_path, {"digits": previous.SerializeToString()})
    registry = _FakeRegistry({"digits"}, fail_load=True)
    control, sent = _control(tmp_path, registry, [True, True])
    with pytest.raises(ModelLoadError, match="out of memory"):
        await control.load("digits", mc.ModelConfig(max_batch_size=8))
    # The sibling loaded the new config; it is reloaded with the recorded one, here nothing changed.
    assert [(call, config.max_batch_size) for call, _, config in sent] == [("load", 8), ("load", 4)]  # type: ignore[attr-defined]
    assert [(call, name) for call, name, _ in registry.calls] == [("load", "digits")]
    assert workers.read_models(tmp_path) == {"digits": previous.SerializeToString()}


async def test_unload_is_not_found_only_when_no_worker_had_the_model(tmp_path: Path) -> None:
    from server.core.errors import ModelNotFoundError

    registry = _FakeRegistry(set())
    control, _ = _control(tmp_path, registry, [True, ModelNotFoundError("model 'x' is not loaded")])

    async def not_loaded(name: str) -> None:
        raise ModelNotFoundError(f"model '{name}' is not loaded")

    registry.unload = not_loaded  # type: ignore[method-assign]
    # Here it was not loaded but the sibling had it: the workers agree again, and that is a success.
    await control.unload("x")
    with pytest.raises(ModelNotFoundError):
        await control.unload("x")


class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def test_restart_backoff_doubles_to_ten_seconds_and_resets_after_a_stable_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from server import workers
    from server.settings import Settings

    clock = [1000.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    spawned: list[_FakeProcess] = []

    def spawn(index: int) -> _FakeProcess:
        spawned.append(_FakeProcess(100 + len(spawned)))
        return spawned[-1]

    supervisor = workers._Supervisor(Settings(workers=1), 0, tmp_path)
    monkeypatch.setattr(supervisor, "spawn", spawn)
    supervisor.start_all()
    delays = []
    for _ in range(7):  # dies at once after every start
        spawned[-1].returncode = -9
        supervisor.tend()
        worker = supervisor.workers[0]
        assert worker.restart_at is not None
        delays.append(worker.restart_at - clock[0])
        clock[0] = worker.restart_at
        supervisor.tend()
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert len(spawned) == 8
    assert "worker 0 exited with signal 9 (SIGKILL); restarting in 0.5 s" in caplog.text
    clock[0] += workers.STABLE_AFTER_S  # a worker that ran a while is restarted at once again
    spawned[-1].returncode = 3
    supervisor.tend()
    assert supervisor.workers[0].restart_at == clock[0] + 0.5
    assert "worker 0 exited with code 3; restarting in 0.5 s" in caplog.text
