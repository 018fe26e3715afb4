"""Model repository reading, config completion and version selection, without a server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exporters.export import ExportSpec
from exporters.graphs import export_graph, identity_model, suffix_model
from server.core.errors import InvalidInputError, ModelLoadError, ModelNotFoundError, ModelNotReadyError
from server.repository.loader import load_model, select_versions
from server.repository.registry import ModelRegistry
from server.repository.repository import (
    LoadAbandonedError,
    ModelRepository,
    VersionLoadError,
    parse_config,
    parse_version,
)
from server.schema import model_config_pb2 as mc

PBTXT = """
name: "m"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3, -1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [ 4, 8 ] }
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
YAML = """
name: m
max_batch_size: 8
input:
  - {name: x, data_type: TYPE_FP32, dims: [3, -1]}
dynamic_batching: {max_queue_delay_microseconds: 100, preferred_batch_size: [4, 8]}
instance_group: [{count: 2, kind: KIND_CPU}]
parameters: {intra_op_thread_count: {string_value: "1"}}
"""
JSON = """{"name": "m", "maxBatchSize": 8, "input": [{"name": "x", "dataType": "TYPE_FP32", "dims": ["3", "-1"]}],
"dynamicBatching": {"maxQueueDelayMicroseconds": "100", "preferredBatchSize": [4, 8]},
"instanceGroup": [{"count": 2, "kind": "KIND_CPU"}], "parameters": {"intra_op_thread_count": {"stringValue": "1"}}}"""


def test_the_three_config_formats_read_the_same() -> None:
    configs = [parse_config(PBTXT, ".pbtxt"), parse_config(YAML, ".yaml"), parse_config(JSON, ".json")]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].dynamic_batching.preferred_batch_size == [4, 8]


@pytest.mark.parametrize(
    "text, suffix",
    [("max_batch_size: oops", ".pbtxt"), ("no_such_field: 1", ".pbtxt"), ("[1, 2]", ".yaml"), ("{", ".json")],
)
def test_bad_configs_name_the_problem(text: str, suffix: str) -> None:
    with pytest.raises(ModelLoadError, match="config"):
        parse_config(text, suffix)


@pytest.fixture()
def repo(tmp_path: Path) -> ModelRepository:
    export_graph(identity_model(["FP32"], ["batch", 3]), ExportSpec([], [], max_batch_size=4), tmp_path, "ident")
    export_graph(suffix_model(), ExportSpec([], [], max_batch_size=4), tmp_path, "text")
    return ModelRepository(tmp_path)


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/etc", "", ".hidden", "x" * 200])
def test_names_that_escape_or_are_invalid_are_refused(repo: ModelRepository, name: str) -> None:
    with pytest.raises(InvalidInputError):
        repo.model_dir(name)


def test_symlink_out_of_the_repository_is_refused(repo: ModelRepository, tmp_path: Path) -> None:
    outside = tmp_path.parent / "outside_model"
    outside.mkdir(exist_ok=True)
    (repo.root / "sneaky").symlink_to(outside)
    with pytest.raises(InvalidInputError):
        repo.model_dir("sneaky")


def test_a_config_free_model_is_completed_from_the_graph(repo: ModelRepository) -> None:
    (repo.root / "ident" / "config.pbtxt").unlink()
    [model] = load_model(repo, "ident", "cpu", default_max_batch_size=16)
    assert model.signature.max_batch_size == 16
    assert [(s.name, s.datatype, s.dims) for s in model.signature.inputs] == [("in_fp32", "FP32", (3,))]
    assert model.config.platform == "onnxruntime_onnx"
    assert model.config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    model.close()


def test_a_partial_config_keeps_what_it_says(repo: ModelRepository) -> None:
    (repo.root / "ident" / "config.pbtxt").write_text('max_batch_size: 2 output [{ name: "out_fp32" }]')
    [model] = load_model(repo, "ident", "cpu", default_max_batch_size=16)
    assert model.signature.max_batch_size == 2
    assert [s.name for s in model.signature.inputs] == ["in_fp32"]
    model.close()


@pytest.mark.parametrize(
    "config, message",
    [
        ('input [{ name: "nope" }]', "is not in the model"),
        ('max_batch_size: 4 input [{ name: "in_fp32" data_type: TYPE_INT32 }]', "TYPE_INT32"),
        ('max_batch_size: 4 input [{ name: "in_fp32" dims: [4] }]', "dims"),
        ('max_batch_size: 4 input [{ name: "in_fp32" dims: [3, 1] }]', "dims"),
        ('name: "other"', "directory is 'ident'"),
        ('platform: "tensorflow_savedmodel"', "not supported"),
        ('default_model_filename: "../model.onnx"', "plain file name"),
        ('parameters { key: "intra_op_thread_count" value { string_value: "many" } }', "bad session parameter"),
        ('parameters { key: "graph_optimization_level" value { string_value: "max" } }', "graph_optimization_level"),
        ('version_policy { specific { versions: [3] } }', "not in the repository"),
        ('output [{ name: "out_fp32" label_filename: "../../etc/passwd" }]', "label file"),
    ],
)
def test_configs_that_contradict_the_model_fail_with_a_reason(repo: ModelRepository, config: str, message: str) -> None:
    (repo.root / "ident" / "config.pbtxt").write_text(config)
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
        load_model(repo, "ident", "cpu", default_max_batch_size=8)


def test_version_policies() -> None:
    latest = mc.ModelVersionPolicy()
    assert select_versions(latest, [3, 1, 2]) == [3]
    two = mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=2))
    assert select_versions(two, [3, 1, 2]) == [2, 3]
    every = mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    assert select_versions(every, [3, 1, 2]) == [1, 2, 3]
    some = mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[1, 3]))
    assert select_versions(some, [3, 1, 2]) == [1, 3]


async def test_registry_serves_versions_and_survives_a_broken_model(repo: ModelRepository) -> None:
    shutil.copytree(repo.root / "ident" / "1", repo.root / "ident" / "2")
    (repo.root / "ident" / "config.pbtxt").write_text("version_policy { all {} }")
    bad = repo.root / "bad" / "1"
    bad.mkdir(parents=True)
    (bad / "model.onnx").write_bytes(b"\x00\x01")
    registry = ModelRegistry(repo, "cpu", 8)
    await registry.load_all()
    try:
        assert registry.get("ident").version == 2
        assert registry.get("ident", "1").version == 1
        assert registry.get("text").name == "text"
        with pytest.raises(ModelNotFoundError):
            registry.get("ident", "5")
        with pytest.raises(ModelNotReadyError, match="is not an ONNX model"):
            registry.get("bad")
        rows = {(r.name, r.version): r for r in registry.index()}
        assert rows[("ident", "1")].state == rows[("ident", "2")].state == "READY"
        # The failing version's own row, as Triton reports it.
        assert rows[("bad", "1")].state == "UNAVAILABLE" and "version 1" in rows[("bad", "1")].reason
        assert [r.name for r in registry.index(ready_only=True)] == ["ident", "ident", "text"]
    finally:
        await registry.close()


def test_loaded_model_does_not_read_its_file_again(repo: ModelRepository) -> None:
    [model] = load_model(repo, "ident", "cpu", 8)
    (repo.root / "ident" / "1" / "model.onnx").write_bytes(b"garbage")
    import numpy as np

    assert model._instances[0].run({"in_fp32": np.ones((1, 3), np.float32)}, ["out_fp32"])[0].tolist() == [[1, 1, 1]]
    model.close()


@pytest.mark.parametrize("text", ["1", "007", "9223372036854775807"])
def test_ascii_decimal_versions_parse(text: str) -> None:
    assert parse_version(text) == int(text)


@pytest.mark.parametrize(
    "text", ["\u00b2", "\u0661", "1\u0661", "-1", "+1", " 1", "1.0", "", "9223372036854775808", "9" * 5000]
)
def test_anything_else_is_not_a_version(text: str) -> None:
    assert parse_version(text) is None


def test_version_folders_with_non_ascii_digits_are_not_versions(repo: ModelRepository) -> None:
    shutil.copytree(repo.root / "ident" / "1", repo.root / "ident" / "\u0662")
    shutil.copytree(repo.root / "ident" / "1", repo.root / "ident" / "\u00b3")
    assert repo.scan_versions("ident", "model.onnx") == ({1: repo.root / "ident" / "1"}, {})


def test_symlinks_out_of_the_model_directory_are_refused_and_inside_allowed(
    repo: ModelRepository, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(repo.root / "ident" / "1", outside)
    ident = repo.root / "ident"
    (ident / "2").symlink_to(outside)
    (ident / "3").mkdir()
    (ident / "3" / "model.onnx").symlink_to(outside / "model.onnx")
    (ident / "4").symlink_to(ident / "1")  # inside the model directory: allowed
    usable, refused = repo.scan_versions("ident", "model.onnx")
    assert usable == {1: ident / "1", 4: ident / "4"}
    assert "folder '2'" in refused[2] and "outside the model directory" in refused[2]
    assert "'3/model.onnx'" in refused[3]
    shutil.copytree(ident / "1", ident / "01")
    assert "all name version 1" in repo.scan_versions("ident", "model.onnx")[1][1]


def test_a_refused_newest_version_fails_the_load_naming_the_file(repo: ModelRepository, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(repo.root / "ident" / "1", outside)
    (repo.root / "ident" / "2").symlink_to(outside)
    with pytest.raises(VersionLoadError, match="version 2: folder '2' is a symbolic link") as err:
        load_model(repo, "ident", "cpu", 8)
    assert err.value.version == 2


def test_config_symlink_out_of_the_model_directory_is_refused(repo: ModelRepository, tmp_path: Path) -> None:
    config = repo.root / "ident" / "config.pbtxt"
    (tmp_path / "elsewhere.pbtxt").write_text(config.read_text())
    config.unlink()
    config.symlink_to(tmp_path / "elsewhere.pbtxt")
    with pytest.raises(ModelLoadError, match="'config.pbtxt' is a symbolic link that leads outside"):
        repo.read_config("ident")


def test_fingerprint_follows_symlinked_version_folders(repo: ModelRepository, tmp_path: Path) -> None:
    ident = repo.root / "ident"
    before = repo.fingerprint("ident")
    shutil.copytree(ident / "1", tmp_path / "staged")
    (ident / "staged").symlink_to(ident / "1")  # not a version, but a folder inside: followed too
    assert repo.fingerprint("ident") != before
    middle = repo.fingerprint("ident")
    (ident / "1" / "model.onnx").write_bytes((ident / "1" / "model.onnx").read_bytes() + b"")
    import os

    os.utime(ident / "1" / "model.onnx", ns=(1, 1))
    assert repo.fingerprint("ident") != middle


def test_an_abandoned_load_stops_between_instances_and_closes_them(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from server.repository import loader

    (repo.root / "ident" / "config.pbtxt").write_text("instance_group [{ count: 4 kind: KIND_CPU }]")
    abandoned = threading.Event()
    built: list[object] = []
    closed: list[object] = []
    real = loader.ort_runtime.OnnxRuntimeSession

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)
            if len(built) == 2:
                abandoned.set()  # the client goes away while the second instance is built

        def close(self) -> None:
            closed.append(self)
            super().close()

    monkeypatch.setattr(loader.ort_runtime, "OnnxRuntimeSession", Counting)
    with pytest.raises(LoadAbandonedError):
        load_model(repo, "ident", "cpu", 8, abandoned=abandoned)
    assert len(built) == 2 and closed == built


@pytest.mark.parametrize("count, stopped_at", [(3, 2), (1, 1)])
async def test_a_cancelled_registry_load_is_abandoned_and_releases_its_sessions(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch, count: int, stopped_at: int
) -> None:
    """With 3 instances the build stops after the one in progress; with 1 it ends and is closed."""
    import asyncio
    import threading

    from server.repository import loader

    (repo.root / "ident" / "config.pbtxt").write_text(f"instance_group [{{ count: {count} kind: KIND_CPU }}]")
    building, proceed = threading.Event(), threading.Event()
    built: list[object] = []
    closed: list[object] = []
    real = loader.ort_runtime.OnnxRuntimeSession

    class Held(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)
            if len(built) == stopped_at:
                building.set()
                assert proceed.wait(60)

        def close(self) -> None:
            closed.append(self)
            super().close()

    monkeypatch.setattr(loader.ort_runtime, "OnnxRuntimeSession", Held)
    registry = ModelRegistry(repo, "cpu", 8)
    try:
        task = asyncio.ensure_future(registry.load("ident"))
        assert await asyncio.to_thread(building.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "ident" not in {e.name for e in registry.entries()}
        assert not registry.is_ready("ident")
        proceed.set()
        for _ in range(6000):
            if len(closed) == len(built):
                break
            await asyncio.sleep(0.01)
        assert len(built) == stopped_at and sorted(map(id, closed)) == sorted(map(id, built))
    finally:
        proceed.set()
        await registry.close()


async def test_an_ensemble_that_reaches_itself_at_run_time_stops_at_the_depth_bound() -> None:
    """Loads refuse cycles; should two concurrent loads still make one, a request stops at 8 levels."""
    import numpy as np

    from server.core.ensemble import MAX_ENSEMBLE_DEPTH, EnsembleModel, EnsembleStep
    from server.core.model import ModelSignature
    from server.core.types import InferRequest, InputTensor, TensorSpec

    spec = [TensorSpec("x", "FP32", (2,))]
    out = [TensorSpec("y", "FP32", (2,))]
    calls: list[str] = []

    def lookup(name: str, version: str) -> EnsembleModel:
        calls.append(name)
        return looping

    steps = [EnsembleStep("loop", -1, {"x": "x"}, {"y": "y"})]
    looping = EnsembleModel("loop", 1, ModelSignature(spec, out, 8), steps, lookup, None)
    request = InferRequest("loop", inputs=[InputTensor("x", "FP32", (1, 2), np.zeros((1, 2), np.float32))])
    with pytest.raises(ModelNotReadyError, match=f"nested more than {MAX_ENSEMBLE_DEPTH}"):
        await looping.infer(request)
    assert len(calls) == MAX_ENSEMBLE_DEPTH
