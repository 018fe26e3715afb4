"""`--workers 2`: two processes on one port still look like one server."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from server.runtime.cpus import usable_cpus
from tests.conftest import ServerProcess


def addsub_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="addsub")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[4])
        request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return request


def test_two_workers_share_the_port_and_add_up_statistics(repository, tmp_path: Path) -> None:
    server = ServerProcess(repository.path, tmp_path, "--workers", "2", "--strict-readiness", "false")
    try:
        seen_workers = set()
        for _ in range(20):
            # A new channel is a new connection; the kernel spreads connections over the workers.
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
                for _ in range(5):
                    stub.ModelInfer(addsub_request(), timeout=30)
                stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="addsub"), timeout=30).model_stats
                _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=30)
                seen_workers.update(v for k, v in call.initial_metadata() if k == "ortserve-worker")
            assert len(stats) == 1
        with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="addsub"), timeout=30).model_stats[0]
        assert seen_workers == {"0", "1"}  # both processes took connections
        assert stats.inference_stats.success.count == 100
        assert stats.execution_count == 100
        log = server.log()
        assert "worker 0" in log and "worker 1" in log and "with 2 workers" in log
        # The workers divide the CPUs: each sizes ONNX Runtime's pool for its half, not for all of them.
        threads = max(1, usable_cpus() // 2)
        loaded = re.findall(r"loaded model 'addsub' version 1 on \w+ \(1 instance\(s\), max_batch_size \d+, "
                            r"intra-op threads ([^)]+)\)", log)
        assert loaded == [str(threads)] * 2, log
    finally:
        code = server.stop()
    assert code == 0, server.log()


def test_default_worker_count_is_two_on_two_cores() -> None:
    from server.settings import Settings

    settings = Settings()
    assert settings.workers == 0
    expected = 2 if (__import__("os").cpu_count() or 1) >= 2 else 1
    assert settings.resolved_workers() == expected
    assert Settings(workers=3).resolved_workers() == 3


def test_explicit_loads_reach_every_worker(repository, tmp_path: Path) -> None:
    server = ServerProcess(
        repository.path, tmp_path, "--workers", "2", "--model-control-mode", "explicit", "--load-model", "addsub"
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"), timeout=120)
        for _ in range(10):
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                assert stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=30).ready
    finally:
        assert server.stop() == 0, server.log()
