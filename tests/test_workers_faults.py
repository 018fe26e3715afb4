"""`--workers 2` under faults: racing model control, a killed worker, SIGTERM with requests in flight."""

from __future__ import annotations

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
    """Yields (worker index, stub on a connection to it) once for each worker, opening connections until all were seen."""
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
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="addsub"), metadata=header, timeout=WAIT_S)
        views = _views(server.address)
        assert all("addsub" not in ready for ready, _ in views.values()), views
        channel, stub = _fresh_stub(server.address)
        with channel:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="suffix"), metadata=header, timeout=WAIT_S)
            # Statistics asked with the header on the public port still add up every worker.
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="suffix"), metadata=header, timeout=WAIT_S)
            assert len(stats.model_stats) == 1
        views = _views(server.address)
        assert all(ready == {"suffix"} for ready, _ in views.values()), views
    finally:
        assert server.stop() == 0, server.log()
