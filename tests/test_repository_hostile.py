"""A hostile model repository and hostile model-control calls: versions, symlinks, names, ensembles.

Each test talks to a real server process through tritonclient's stub. What is refused is
reported in RepositoryIndex with a reason, and nothing refused can hurt the models served.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from exporters.export import ExportSpec, write_ensemble
from exporters.graphs import export_graph, identity_model
from tests.conftest import ServerProcess
from tests.gate import WAIT_S, Gate, gate_config, wait_until

Rows = list[tuple[str, str, str, str]]


def index_rows(stub) -> Rows:  # type: ignore[no-untyped-def]
    rows = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
    return [(m.name, m.version, m.state, m.reason) for m in rows]


def rows_of(stub, name: str) -> Rows:  # type: ignore[no-untyped-def]
    return [r for r in index_rows(stub) if r[0] == name]


def export_identity(root: Path, name: str, version: int = 1, extra_config: str = "") -> Path:
    """An FP32 [batch, 2] identity (in_fp32 -> out_fp32); returns the version folder."""
    spec = ExportSpec([], [], max_batch_size=8, extra_config=extra_config)
    export_graph(identity_model(["FP32"], ["batch", 2]), spec, root, name, version)
    return root / name / str(version)


def ensemble_config(name: str, steps: list[tuple[str, str, str, str, str]]) -> str:
    """An ensemble x -> y; each step is (model, step input, source tensor, step output, target tensor)."""
    text = "".join(
        f'{{ model_name: "{model}" model_version: -1 input_map {{ key: "{i}" value: "{src}" }} '
        f'output_map {{ key: "{o}" value: "{dst}" }} }},'
        for model, i, src, o, dst in steps
    ).rstrip(",")
    return f"""
        name: "{name}" platform: "ensemble" max_batch_size: 8
        input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 2 ] }} ]
        output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 2 ] }} ]
        ensemble_scheduling {{ step [ {text} ] }}"""


def over_ident(name: str, step_model: str = "ident") -> str:
    """An ensemble with one step: the identity `ident` (or another x -> y ensemble)."""
    if step_model == "ident" or step_model.startswith("plain"):
        return ensemble_config(name, [(step_model, "in_fp32", "x", "out_fp32", "y")])
    return ensemble_config(name, [(step_model, "x", "x", "y", "y")])


def request(model: str, version: str = "", value: float = 1.5) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    name = "x" if model.startswith(("pipe", "deep", "cyc")) else "in_fp32"
    message.inputs.add(name=name, datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.full((1, 2), value, np.float32).tobytes())
    return message


def first_output(response: pb.ModelInferResponse) -> list[float]:
    return np.frombuffer(response.raw_output_contents[0], np.float32).tolist()


def statistics(stub, name: str):  # type: ignore[no-untyped-def]
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=30).model_stats[0]


class Hostile:
    """The shared repository of this module and its gate."""

    def __init__(self, root: Path, outside: Path, gate: Gate) -> None:
        self.root = root
        self.outside = outside
        self.gate = gate


def build(root: Path, outside: Path, gate: Gate) -> None:
    export_identity(root, "ident")
    # Folders named by non-ASCII digits ("2" in Arabic-Indic, superscript 3) are not versions.
    shutil.copytree(root / "ident" / "1", root / "ident" / "\u0662")
    shutil.copytree(root / "ident" / "1", root / "ident" / "\u00b3")
    # Symlinks leading out of the model directory: a version folder, and a model file.
    export_identity(outside, "elsewhere")
    export_identity(root, "outside_dir")
    shutil.rmtree(root / "outside_dir" / "1")
    (root / "outside_dir" / "1").symlink_to(outside / "elsewhere" / "1")
    export_identity(root, "outside_file")
    (root / "outside_file" / "1" / "model.onnx").unlink()
    (root / "outside_file" / "1" / "model.onnx").symlink_to(outside / "elsewhere" / "1" / "model.onnx")
    # A symlink that stays inside the model directory is allowed.
    export_identity(root, "inside_link", extra_config="version_policy { all {} }")
    (root / "inside_link" / "2").symlink_to("1")
    # Directory names that cannot be model names.
    for bad in ("my model", "mod\u00e8le"):
        export_identity(root, "plain_template")
        os.rename(root / "plain_template", root / bad)
    os.mkdir(os.path.join(os.fsencode(root), b"not-utf8-\xff"))  # a name that is not even UTF-8
    # Ensembles: fine, naming a missing model, naming itself, a cycle, nested 8 and 9 deep.
    write_ensemble(root, "pipe_ok", over_ident("pipe_ok"))
    write_ensemble(root, "pipe_missing", over_ident("pipe_missing", "plain_no_such_model"))
    write_ensemble(root, "pipe_self", over_ident("pipe_self", "pipe_self"))
    write_ensemble(root, "cyc_a", over_ident("cyc_a", "cyc_b"))
    write_ensemble(root, "cyc_b", over_ident("cyc_b", "cyc_a"))
    for level in range(1, 10):
        inner = "ident" if level == 1 else f"deep_{level - 1}"
        write_ensemble(root, f"deep_{level}", over_ident(f"deep_{level}", inner))
    # An ensemble whose first step is held at a gate (a run in progress for as long as the test wants).
    export_identity(root, "held", extra_config=gate_config(gate.directory))
    export_identity(root, "after")
    write_ensemble(root, "pipe_held", ensemble_config("pipe_held", [
        ("held", "in_fp32", "x", "out_fp32", "mid"), ("after", "in_fp32", "mid", "out_fp32", "y"),
    ]))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    base = tmp_path_factory.mktemp("hostile")
    gate = Gate(base / "gate")
    build(base / "repo", base / "outside", gate)
    return Hostile(base / "repo", base / "outside", gate)


@pytest.fixture(scope="module")
def hostile_stub(hostile: Hostile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    server = ServerProcess(hostile.root, tmp_path_factory.mktemp("hostile_server"), "--strict-readiness", "false")
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        hostile.gate.open()
        assert server.stop() == 0, server.log()


# Triton answers INVALID_ARGUMENT for a version that is not an integer (or out of int64
# range) and NOT_FOUND for a well-formed version that is not served; so does ortserve.
@pytest.mark.parametrize(
    "version", ["\u00b2", "\u0661", "1\u0661", "-1", "1.0", str(10**30), "9223372036854775808", "v" * 100_000]
)
def test_versions_that_are_not_ascii_decimals_are_invalid_argument(hostile_stub, version: str) -> None:  # type: ignore[no-untyped-def]
    stub = hostile_stub
    calls = [
        lambda: stub.ModelInfer(request("ident", version), timeout=30),
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="ident", version=version), timeout=30),
        lambda: stub.ModelConfig(pb.ModelConfigRequest(name="ident", version=version), timeout=30),
        lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="ident", version=version), timeout=30),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "ASCII digits" in err.value.details() and len(err.value.details()) < 300
    assert not stub.ModelReady(pb.ModelReadyRequest(name="ident", version=version), timeout=30).ready


def test_well_formed_versions_that_are_not_served_are_not_found(hostile_stub) -> None:  # type: ignore[no-untyped-def]
    stub = hostile_stub
    for version in ("2", "3", "0", "9223372036854775807"):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request("ident", version), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    assert first_output(stub.ModelInfer(request("ident", "01"), timeout=30)) == [1.5, 1.5]
    # The folders named by non-ASCII digits did not become versions 2 or 3.
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="ident"), timeout=30).versions) == ["1"]


def test_symlinks_out_of_the_model_directory_are_refused_and_reported(hostile_stub) -> None:  # type: ignore[no-untyped-def]
    stub = hostile_stub
    [(_, version, state, reason)] = rows_of(stub, "outside_dir")
    assert (version, state) == ("1", "UNAVAILABLE")
    assert "folder '1' is a symbolic link that leads outside the model directory" in reason
    [(_, version, state, reason)] = rows_of(stub, "outside_file")
    assert (version, state) == ("1", "UNAVAILABLE") and "'1/model.onnx' is a symbolic link" in reason
    for name in ("outside_dir", "outside_file"):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(name), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "symbolic link" in err.value.details()
    # Inside the model directory a symlinked version folder is served like any other.
    assert rows_of(stub, "inside_link") == [("inside_link", "1", "READY", ""), ("inside_link", "2", "READY", "")]
    assert first_output(stub.ModelInfer(request("inside_link", "2"), timeout=30)) == [1.5, 1.5]


def test_directories_with_invalid_model_names_are_reported(hostile_stub) -> None:  # type: ignore[no-untyped-def]
    rows = {r[0]: r for r in index_rows(hostile_stub)}
    for name in ("my model", "mod\u00e8le"):
        _, version, state, reason = rows[name]
        assert (version, state) == ("", "UNAVAILABLE")
        assert reason.startswith(f"not loaded: invalid model name {name!r}")
    # Bytes that are not UTF-8 are shown escaped (a protobuf string must be UTF-8).
    assert rows["not-utf8-\\xff"][2] == "UNAVAILABLE"
    ready = hostile_stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=30).models
    assert "my model" not in {m.name for m in ready}


def test_an_ensemble_naming_a_missing_model_is_refused_at_load(hostile_stub) -> None:  # type: ignore[no-untyped-def]
    stub = hostile_stub
    [(_, _, state, reason)] = rows_of(stub, "pipe_missing")
    assert state == "UNAVAILABLE" and "step 1 (model 'plain_no_such_model')" in reason
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request("pipe_missing"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "plain_no_such_model" in err.value.details()
    assert rows_of(stub, "pipe_ok") == [("pipe_ok", "1", "READY", "")]
    assert first_output(stub.ModelInfer(request("pipe_ok"), timeout=30)) == [1.5, 1.5]


def test_ensemble_cycles_are_refused_and_nesting_is_bounded(hostile_stub) -> None:  # type: ignore[no-untyped-def]
    stub = hostile_stub
    [(_, _, state, reason)] = rows_of(stub, "pipe_self")
    assert state == "UNAVAILABLE" and "is the ensemble itself" in reason
    for name in ("cyc_a", "cyc_b", "pipe_self"):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(name), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Eight nested ensembles serve; a ninth level is refused.
    assert rows_of(stub, "deep_8") == [("deep_8", "1", "READY", "")]
    assert first_output(stub.ModelInfer(request("deep_8", value=2.5), timeout=30)) == [2.5, 2.5]
    [(_, _, state, reason)] = rows_of(stub, "deep_9")
    assert state == "UNAVAILABLE" and "nest more than 8 deep" in reason
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live


def test_a_cancelled_ensemble_request_runs_no_further_step(hostile: Hostile, hostile_stub) -> None:  # type: ignore[no-untyped-def]
    stub = hostile_stub
    with hostile.gate.held():
        seen = len(hostile.gate.entered())
        call = stub.ModelInfer.future(request("pipe_held"), timeout=WAIT_S)
        run = hostile.gate.wait_entered(seen)  # the first step is running
        call.cancel()
        # The server has seen the cancel once the ensemble counts the request as failed.
        wait_until(lambda: statistics(stub, "pipe_held").inference_stats.fail.count == 1, "the ensemble request to end")
        hostile.gate.release(run)
        wait_until(lambda: statistics(stub, "held").execution_count == 1, "the held step's run to end")
    # Had the second step been submitted, it would be queued before this request and counted first.
    assert first_output(stub.ModelInfer(request("after"), timeout=30)) == [1.5, 1.5]
    assert statistics(stub, "after").inference_count == 1


# Explicit mode: broken new versions, cycles made by config overrides, a step model unloaded.


def load(stub, name: str, config: str | None = None) -> None:  # type: ignore[no-untyped-def]
    message = pb.RepositoryModelLoadRequest(model_name=name)
    if config is not None:
        message.parameters["config"].string_param = config
    stub.RepositoryModelLoad(message, timeout=120)


def ensemble_json(steps: list[tuple[str, str, str]]) -> str:
    """A JSON ensemble config x -> y for RepositoryModelLoad; steps are (model, step input, step output)."""
    return json.dumps({
        "platform": "ensemble", "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [2]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [2]}],
        "ensemble_scheduling": {"step": [
            {"model_name": m, "model_version": -1, "input_map": {i: "x"}, "output_map": {o: "y"}} for m, i, o in steps
        ]},
    })


def health_of(channel: grpc.Channel, service: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_explicit_mode_reports_versions_refuses_cycles_and_follows_step_models(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    export_identity(root, "ident")
    write_ensemble(root, "pipe_ok", over_ident("pipe_ok"))
    write_ensemble(root, "pipe_outer", over_ident("pipe_outer", "pipe_ok"))
    server = ServerProcess(root, tmp_path, "--model-control-mode", "explicit", "--load-model", "*")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert first_output(stub.ModelInfer(request("pipe_outer"), timeout=30)) == [1.5, 1.5]
            for call, message in (
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest),
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(message(model_name="m" * 100_000), timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 300
            # A broken new version: its own row, naming it; version 1 keeps its READY row and serves.
            (root / "ident" / "3").mkdir()
            (root / "ident" / "3" / "model.onnx").write_bytes(b"garbage")
            with pytest.raises(grpc.RpcError) as err:
                load(stub, "ident")
            assert "version 3" in err.value.details()
            rows = rows_of(stub, "ident")
            assert ("ident", "1", "READY", "") in rows
            [failed] = [r for r in rows if r[2] == "UNAVAILABLE"]
            assert failed[1] == "3" and "version 3" in failed[3] and "still serving version(s) 1" in failed[3]
            assert first_output(stub.ModelInfer(request("ident"), timeout=30)) == [1.5, 1.5]
            shutil.rmtree(root / "ident" / "3")
            # Config overrides may not close a cycle: directly, or through other ensembles.
            with pytest.raises(grpc.RpcError) as err:
                load(stub, "pipe_ok", ensemble_json([("pipe_ok", "x", "y")]))
            assert "is the ensemble itself" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                load(stub, "ident", ensemble_json([("pipe_outer", "x", "y")]))
            assert "cycle: ident -> pipe_outer -> pipe_ok -> ident" in err.value.details()
            assert first_output(stub.ModelInfer(request("pipe_outer"), timeout=30)) == [1.5, 1.5]
            # A step's model unloaded: the ensembles are not ready and say why, until it is back.
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="ident"), timeout=60)
            for name in ("pipe_ok", "pipe_outer"):
                assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=30).ready
                # (pipe_ok also keeps the row of its refused override above, version "".)
                [(_, _, state, reason)] = [r for r in rows_of(stub, name) if r[1] == "1"]
                assert state == "UNAVAILABLE" and "step model" in reason and "'ident'" in reason
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(request(name), timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "'ident'" in err.value.details()
            # gRPC health follows readiness, not just the ensemble's own load state.
            wait_until(lambda: health_of(channel, "pipe_outer") == "NOT_SERVING", "pipe_outer to be NOT_SERVING")
            load(stub, "ident")
            assert stub.ModelReady(pb.ModelReadyRequest(name="pipe_outer"), timeout=30).ready
            wait_until(lambda: health_of(channel, "pipe_outer") == "SERVING", "pipe_outer to be SERVING again")
            assert first_output(stub.ModelInfer(request("pipe_outer"), timeout=30)) == [1.5, 1.5]
    finally:
        assert server.stop() == 0, server.log()


def test_poll_mode_follows_symlinked_version_folders_and_refuses_those_leading_out(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    export_identity(root, "ident")
    # Staged inside the model directory before the server starts, so only the symlink is new.
    shutil.copytree(root / "ident" / "1", root / "ident" / ".next")
    export_identity(tmp_path / "outside", "elsewhere")
    server = ServerProcess(root, tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ModelReady(pb.ModelReadyRequest(name="ident", version="1"), timeout=30).ready
            (root / "ident" / "2").symlink_to(".next")
            wait_until(
                lambda: stub.ModelReady(pb.ModelReadyRequest(name="ident", version="2"), timeout=30).ready,
                "the symlinked version 2 to load",
            )
            (root / "ident" / "3").symlink_to(tmp_path / "outside" / "elsewhere" / "1")
            wait_until(lambda: any(r[1] == "3" for r in rows_of(stub, "ident")), "version 3's refusal to be reported")
            [(_, _, state, reason)] = [r for r in rows_of(stub, "ident") if r[1] == "3"]
            assert state == "UNAVAILABLE" and "folder '3' is a symbolic link that leads outside" in reason
            assert ("ident", "2", "READY", "") in rows_of(stub, "ident")
            assert first_output(stub.ModelInfer(request("ident"), timeout=30)) == [1.5, 1.5]
    finally:
        assert server.stop() == 0, server.log()
