"""Versions, hot reload with zero failed requests, broken versions, safe files, pipelines, memory."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from exporters.export import ExportSpec, export_torch, write_ensemble
from exporters.graphs import export_graph, identity_model
from tests.conftest import ServerProcess


class Scale(torch.nn.Module):
    """y = k * x on FP32 [B, 4]: each version has its own k, so answers show the version."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


SCALE_CONFIG = "dynamic_batching { }"


def export_scale(repo: Path, version: int, k: float, staging: Path | None = None) -> None:
    """Writes version `version` of model `scale`; with staging, builds elsewhere then renames (atomic)."""
    target = staging or repo
    spec = ExportSpec(["x"], ["y"], max_batch_size=8, extra_config=SCALE_CONFIG)
    export_torch(Scale(k), (torch.ones(2, 4),), spec, target, "scale", version)
    if staging is not None:
        (repo / "scale" / str(version)).parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging / "scale" / str(version), repo / "scale" / str(version))


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    export_scale(root, 1, 1.0)
    export_graph(identity_model(["FP32"], ["batch", "n"]), ExportSpec([], [], max_batch_size=8), root, "big")
    return root


def scale_request(value: float = 1.0) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return request


def answer(response: pb.ModelInferResponse) -> float:
    return float(np.frombuffer(response.raw_output_contents[0], np.float32)[0])


class SteadyTraffic:
    """A client thread sending requests back to back, recording each answer or failure."""

    def __init__(self, address: str) -> None:
        self.answers: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(answer(self._stub.ModelInfer(scale_request(), timeout=30)))
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    def wait_for(self, value: float, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.answers and self.answers[-1] == value:
                return
            time.sleep(0.05)
        raise AssertionError(f"answers never became {value}: last {self.answers[-5:]}, failures {self.failures[:3]}")

    def wait_for_more(self, count: int = 10, timeout_s: float = 60) -> None:
        """Waits until `count` more requests have ended (answered or failed), however long they take."""
        target = len(self.answers) + len(self.failures) + count
        deadline = time.monotonic() + timeout_s
        while len(self.answers) + len(self.failures) < target:
            assert time.monotonic() < deadline, f"traffic stalled: {self.failures[:3]}"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._channel.close()


def switched_once(answers: list[float], old: float, new: float) -> bool:
    """Answers are old...old new...new: the switch happens once and never goes back."""
    first_new = answers.index(new)
    return set(answers[:first_new]) <= {old} and set(answers[first_new:]) == {new}


def index_rows(stub) -> list[tuple[str, str, str, str]]:  # type: ignore[no-untyped-def]
    rows = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
    return [(m.name, m.version, m.state, m.reason) for m in rows]


def test_poll_mode_picks_up_a_new_version_with_zero_failed_requests(repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(repo, tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    traffic = SteadyTraffic(server.address)
    try:
        traffic.wait_for(1.0)
        export_scale(repo, 2, 2.0, staging=tmp_path / "staging")
        traffic.wait_for(2.0)
        traffic.wait_for_more()  # and it stays on the new version
    finally:
        traffic.stop()
        assert server.stop() == 0, server.log()
    assert traffic.failures == []
    assert switched_once(traffic.answers, 1.0, 2.0)


def test_poll_mode_keeps_serving_when_the_new_version_is_corrupt(repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(repo, tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    traffic = SteadyTraffic(server.address)
    try:
        traffic.wait_for(1.0)
        staging = tmp_path / "bad" / "3"
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(b"\x08\x07 truncated garbage")
        os.rename(staging, repo / "scale" / "3")
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 30
            while not any(r[2] == "UNAVAILABLE" and r[0] == "scale" for r in index_rows(stub)):
                assert time.monotonic() < deadline, index_rows(stub)
                time.sleep(0.1)
            rows = index_rows(stub)
        traffic.wait_for_more()  # still served after the failed load
    finally:
        traffic.stop()
        assert server.stop() == 0, server.log()
    assert ("scale", "1", "READY", "") in rows
    assert any(r[0] == "scale" and "still serving" in r[3] and "not an ONNX model" in r[3] for r in rows), rows
    assert traffic.failures == [] and set(traffic.answers) == {1.0}


def load(stub, name: str, config: dict | None = None) -> None:  # type: ignore[no-untyped-def]
    request = pb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        request.parameters["config"].string_param = json.dumps(config)
    stub.RepositoryModelLoad(request, timeout=120)


def test_explicit_mode_load_reload_and_unload_through_the_api(repo: Path, tmp_path: Path) -> None:
    export_scale(repo, 2, 2.0)
    server = ServerProcess(repo, tmp_path, "--model-control-mode", "explicit", "--load-model", "scale")
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            assert ("big", "", "UNAVAILABLE", "not loaded") in index_rows(stub)
            traffic = SteadyTraffic(server.address)
            try:
                traffic.wait_for(2.0)  # the default policy serves the latest version
                # Reload with a config override that pins version 1: the switch is atomic.
                load(stub, "scale", {"version_policy": {"specific": {"versions": [1]}}, "dynamic_batching": {}})
                traffic.wait_for(1.0)
                # Load and unload another model while traffic flows: scale is not disturbed.
                load(stub, "big")
                assert stub.ModelReady(pb.ModelReadyRequest(name="big"), timeout=30).ready
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="big"), timeout=60)
                assert not stub.ModelReady(pb.ModelReadyRequest(name="big"), timeout=30).ready
                # Broken reloads: wrong config, failing warm-up, corrupt file: version 1 keeps serving.
                with pytest.raises(grpc.RpcError) as err:
                    load(stub, "scale", {"input": [{"name": "nope"}]})
                assert "is not in the model" in err.value.details()
                with pytest.raises(grpc.RpcError) as err:
                    missing = {"data_type": "TYPE_FP32", "dims": [4], "input_data_file": "missing.bin"}
                    load(stub, "scale", {"model_warmup": [{"name": "w", "batch_size": 1, "inputs": {"x": missing}}]})
                assert "warm-up" in err.value.details()
                broken = repo / "scale" / "3"
                broken.mkdir()
                (broken / "model.onnx").write_bytes(b"garbage")
                with pytest.raises(grpc.RpcError) as err:
                    load(stub, "scale")
                assert "not an ONNX model" in err.value.details()
                rows = index_rows(stub)
                assert ("scale", "1", "READY", "") in rows
                assert any(r[0] == "scale" and "still serving" in r[3] for r in rows)
                traffic.wait_for_more()
            finally:
                traffic.stop()
            assert traffic.failures == [], traffic.failures[:3]
            assert switched_once(traffic.answers, 2.0, 1.0)
            # Unloading the model itself: later requests are UNAVAILABLE, with the reason.
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="scale"), timeout=60)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(scale_request(), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "unloaded" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../scale"), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            assert server.stop() == 0, server.log()


def test_warmup_runs_before_ready(repo: Path, tmp_path: Path) -> None:
    config = (repo / "scale" / "config.pbtxt").read_text()
    (repo / "scale" / "config.pbtxt").write_text(
        config + '\nmodel_warmup [{ name: "zeros" batch_size: 4 count: 3'
        ' inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] zero_data: true } } }]'
    )
    server = ServerProcess(repo, tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert answer(stub.ModelInfer(scale_request(), timeout=30)) == 1.0
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="scale"), timeout=30).model_stats[0]
            assert stats.execution_count == 1  # warm-up runs are not client traffic
    finally:
        assert server.stop() == 0


def test_loaded_model_ignores_its_files_changing(repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(repo, tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            before = answer(stub.ModelInfer(scale_request(3.0), timeout=30))
            model_file = repo / "scale" / "1" / "model.onnx"
            with open(model_file, "r+b") as f:
                f.truncate(10)
            assert answer(stub.ModelInfer(scale_request(3.0), timeout=30)) == before
            export_scale(tmp_path / "other", 1, 5.0)
            shutil.copy(tmp_path / "other" / "scale" / "1" / "model.onnx", model_file)
            assert answer(stub.ModelInfer(scale_request(3.0), timeout=30)) == before
            shutil.rmtree(repo / "scale")
            assert answer(stub.ModelInfer(scale_request(3.0), timeout=30)) == before
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    finally:
        assert server.stop() == 0, server.log()


def test_external_weights_must_stay_inside_the_model_directory(tmp_path: Path) -> None:
    import onnx
    from onnx import external_data_helper

    from server.core.errors import ModelLoadError
    from server.repository.loader import read_model_bytes

    model = identity_model(["FP32"], ["batch", 4])
    weights = onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    model.graph.initializer.append(weights)
    model.graph.node.append(onnx.helper.make_node("Add", ["out_fp32", "w"], ["sum"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("sum", onnx.TensorProto.FLOAT, ["batch", 4]))
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save(model, version / "model.onnx")
    inlined = onnx.load_from_string(read_model_bytes(version / "model.onnx"))
    assert not any(external_data_helper.uses_external_data(t) for t in inlined.graph.initializer)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../outside.bin"
    (tmp_path / "outside.bin").write_bytes(bytes(16))
    onnx.save(model, version / "model.onnx")
    with pytest.raises(ModelLoadError, match="not a file inside"):
        read_model_bytes(version / "model.onnx")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_returns_near_its_level_after_large_requests(repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(repo, tmp_path)
    small = pb.ModelInferRequest(model_name="big")
    small.inputs.add(name="in_fp32", datatype="FP32", shape=[1, 16])
    small.raw_input_contents.append(bytes(64))
    large = pb.ModelInferRequest(model_name="big")
    large.inputs.add(name="in_fp32", datatype="FP32", shape=[8, 1 << 19])  # 16 MiB in, 16 MiB out
    large.raw_input_contents.append(np.ones((8, 1 << 19), np.float32).tobytes())
    options = [("grpc.max_receive_message_length", 1 << 26), ("grpc.max_send_message_length", 1 << 26)]
    try:
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for i in range(10_000):
                stub.ModelInfer(large if i % 500 == 250 else small, timeout=60)
                if i == 999:
                    after_first_thousand = rss_kib(server.process.pid)
            after_all = rss_kib(server.process.pid)
    finally:
        assert server.stop() == 0
    print(f"RSS after 1,000 requests: {after_first_thousand} KiB; after 10,000: {after_all} KiB")
    # Generous bound (docs/benchmarks.md has the exact figures): no growth with the request count.
    assert after_all <= after_first_thousand * 1.2 + 10_000


def test_pipeline_equals_its_steps_by_hand_and_reports_step_errors(tmp_path: Path) -> None:
    from exporters.models import digits

    root = tmp_path / "repo"
    model, _ = digits.train(digits.DigitsConfig(epochs=2), progress=False)
    digits.export(model, root)
    digits.export_pipeline(root)
    write_ensemble(root, "broken_pipeline", """
        name: "broken_pipeline" platform: "ensemble" max_batch_size: 8
        input [ { name: "pixels" data_type: TYPE_UINT8 dims: [ 8, 8 ] } ]
        output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
        ensemble_scheduling { step [
          { model_name: "digits_preprocess"
            input_map { key: "pixels" value: "pixels" } output_map { key: "image" value: "image" } },
          { model_name: "no_such_model"
            input_map { key: "image" value: "image" } output_map { key: "logits" value: "logits" } }
        ] }""")
    server = ServerProcess(root, tmp_path, "--strict-readiness", "false")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 8, 8)).astype(np.uint8)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="digits_pipeline")
            request.inputs.add(name="pixels", datatype="UINT8", shape=[5, 8, 8])
            request.raw_input_contents.append(pixels.tobytes())
            whole = stub.ModelInfer(request, timeout=30)
            step1 = pb.ModelInferRequest(model_name="digits_preprocess")
            step1.inputs.add(name="pixels", datatype="UINT8", shape=[5, 8, 8])
            step1.raw_input_contents.append(pixels.tobytes())
            image = stub.ModelInfer(step1, timeout=30).raw_output_contents[0]
            step2 = pb.ModelInferRequest(model_name="digits")
            step2.inputs.add(name="image", datatype="FP32", shape=[5, 1, 8, 8])
            step2.raw_input_contents.append(image)
            by_hand = stub.ModelInfer(step2, timeout=30)
            assert [o.name for o in whole.outputs] == ["logits", "probabilities"]
            assert list(whole.raw_output_contents) == list(by_hand.raw_output_contents)
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits_pipeline"), timeout=30)
            assert metadata.platform == "ensemble"
            # A step naming a model that does not exist: refused at load, with the step and model.
            request.model_name = "broken_pipeline"
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "step 2 (model 'no_such_model')" in err.value.details()
            bad = pb.ModelInferRequest(model_name="digits_pipeline")
            bad.inputs.add(name="pixels", datatype="UINT8", shape=[1, 7, 8])
            bad.raw_input_contents.append(bytes(56))
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(bad, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert server.stop() == 0, server.log()
