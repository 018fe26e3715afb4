"""The model config schema: every Triton field parses, unimplemented features are refused by name,
`reshape` maps the wire shape to the model's, and config values are bounded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from exporters.export import ExportSpec, export_torch
from server.core.errors import ModelLoadError
from server.repository import config as model_config
from server.repository.repository import parse_config
from server.schema import model_config_pb2 as mc
from tests.conftest import ServerProcess

# A Triton config that spells out every feature ortserve refuses, each at its disabled value, plus the
# fields accepted without effect: it parses and the model loads.
DISABLED_FEATURES = """
name: "NAME"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 format: FORMAT_NONE dims: [ 4 ]
          is_shape_tensor: false allow_ragged_batch: false optional: false is_non_linear_format_io: false } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] is_shape_tensor: false is_non_linear_format_io: false } ]
optimization {
  graph { level: 1 }
  priority: PRIORITY_DEFAULT
  cuda { graphs: false busy_wait_events: false output_copy_stream: false }
  input_pinned_memory { enable: true }
  output_pinned_memory { enable: false }
  gather_kernel_buffer_threshold: 0
  eager_batching: false
}
dynamic_batching { preserve_ordering: true }
instance_group [ { name: "group" count: 1 kind: KIND_CPU passive: false rate_limiter { priority: 1 } } ]
cc_model_filenames { key: "7.5" value: "model.onnx" }
metric_tags { key: "team" value: "a" }
model_operations { }
model_transaction_policy { decoupled: false }
model_repository_agents { }
response_cache { enable: false }
model_metrics { }
"""

# Features ortserve does not implement, each set, and the field path its refusal must name.
REFUSED = [
    ("sequence_batching { max_sequence_idle_microseconds: 5000000 direct { } "
     "control_input [ { name: \"START\" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] } ] "
     "state [ { input_name: \"s_in\" output_name: \"s_out\" data_type: TYPE_FP32 dims: [ 1 ] "
     "initial_state [ { name: \"z\" data_type: TYPE_FP32 dims: [ 1 ] zero_data: true } ] } ] }",
     "sequence_batching"),
    ("response_cache { enable: true }", "response_cache.enable"),
    ("input [ { name: \"x\" allow_ragged_batch: true } ]", "input[0].allow_ragged_batch"),
    ("input [ { name: \"x\" is_shape_tensor: true } ]", "input[0].is_shape_tensor"),
    ("output [ { name: \"y\" is_shape_tensor: true } ]", "output[0].is_shape_tensor"),
    ("input [ { name: \"x\" is_non_linear_format_io: true } ]", "input[0].is_non_linear_format_io"),
    ("output [ { name: \"y\" is_non_linear_format_io: true } ]", "output[0].is_non_linear_format_io"),
    ("batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: \"n\" data_type: TYPE_FP32 source_input: \"x\" } ]",
     "batch_input"),
    ("batch_output [ { target_name: \"y\" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: \"x\" } ]",
     "batch_output"),
    ("model_repository_agents { agents [ { name: \"checksum\" parameters { key: \"k\" value: \"v\" } } ] }",
     "model_repository_agents"),
    ("optimization { cuda { busy_wait_events: true } }", "optimization.cuda.busy_wait_events"),
    ("optimization { cuda { output_copy_stream: true } }", "optimization.cuda.output_copy_stream"),
    ("optimization { cuda { graph_spec [ { batch_size: 1 input { key: \"x\" value { dim: [ 4 ] } } } ] } }",
     "optimization.cuda.graph_spec"),
    ("optimization { priority: PRIORITY_MAX }", "optimization.priority"),
    ("optimization { eager_batching: true }", "optimization.eager_batching"),
    ("optimization { execution_accelerators { cpu_execution_accelerator [ { name: \"openvino\" } ] } }",
     "optimization.execution_accelerators.cpu_execution_accelerator"),
    ("optimization { execution_accelerators { gpu_execution_accelerator [ { name: \"cuda\" } ] } }",
     "optimization.execution_accelerators.gpu_execution_accelerator[0].name"),
    ("optimization { execution_accelerators { gpu_execution_accelerator [ { name: \"tensorrt\" "
     "parameters { key: \"precision_mode\" value: \"FP16\" } } ] } }",
     "optimization.execution_accelerators.gpu_execution_accelerator[0].parameters"),
    ("instance_group [ { count: 1 rate_limiter { resources [ { name: \"R\" count: 2 } ] } } ]",
     "instance_group[0].rate_limiter"),
    ("instance_group [ { count: 1 secondary_devices [ { kind: KIND_NVDLA device_id: 0 } ] } ]",
     "instance_group[0].secondary_devices"),
    ("instance_group [ { count: 1 profile: [ \"0\" ] } ]", "instance_group[0].profile"),
    ("instance_group [ { count: 1 passive: true } ]", "instance_group[0].passive"),
    ("instance_group [ { count: 1 host_policy: \"numa0\" } ]", "instance_group[0].host_policy"),
    ("instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0, 1 ] } ]", "instance_group[0].gpus"),
    ("instance_group [ { count: 1 kind: KIND_CPU }, { count: 1 kind: KIND_GPU } ]", "instance_group[1]"),
    ("model_operations { op_library_filename: [ \"libcustom.so\" ] }", "model_operations.op_library_filename"),
    ("model_transaction_policy { decoupled: true }", "model_transaction_policy.decoupled"),
    ("model_metrics { metric_control [ { metric_identifier { family: \"nv_inference_request_duration\" } "
     "histogram_options { buckets: [ 1, 10 ] } } ] }", "model_metrics.metric_control"),
    ("runtime: \"libtriton_custom.so\"", "runtime"),
    ("ensemble_scheduling { step [ ] max_inflight_requests: 4 }", "ensemble_scheduling.max_inflight_requests"),
]


def test_every_triton_model_config_field_parses() -> None:
    """The schema has every message, field and enum value of Triton's ModelConfig (names and numbers)."""
    for snippet, _ in REFUSED:
        parse_config(snippet, ".pbtxt")
    config = parse_config(DISABLED_FEATURES, ".pbtxt")
    assert config.response_cache.enable is False
    assert config.dynamic_batching.preserve_ordering
    names = {f.name for f in mc.ModelConfig.DESCRIPTOR.fields}
    assert {
        "batch_input", "batch_output", "sequence_batching", "ensemble_scheduling", "model_repository_agents",
        "response_cache", "model_metrics", "model_operations", "model_transaction_policy", "runtime",
    } <= names
    assert mc.ModelConfig.DESCRIPTOR.fields_by_name["sequence_batching"].number == 13
    assert mc.ModelConfig.DESCRIPTOR.fields_by_name["model_metrics"].number == 26
    assert mc.ModelOptimizationPolicy.DESCRIPTOR.fields_by_name["cuda"].number == 3
    assert mc.ModelInstanceGroup.DESCRIPTOR.fields_by_name["secondary_devices"].number == 8


@pytest.mark.parametrize(("snippet", "path"), REFUSED, ids=[p for _, p in REFUSED])
def test_unimplemented_features_are_refused_by_name(snippet: str, path: str) -> None:
    config = parse_config(snippet, ".pbtxt")
    with pytest.raises(ModelLoadError) as err:
        model_config.check_supported(config)
    assert path in str(err.value)
    assert "not supported by ortserve" in str(err.value)


def test_disabled_values_are_accepted() -> None:
    model_config.check_supported(parse_config(DISABLED_FEATURES, ".pbtxt"))


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


class MatSquare(torch.nn.Module):
    """x @ x on [B, 2, 2]: the answer depends on the model seeing the 2x2 layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, x)


class Transpose(torch.nn.Module):
    """[B, N, 2, 2] -> each 2x2 block transposed, times 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-1, -2) * 3.0


def _write_config(repo: Path, name: str, text: str) -> None:
    (repo / name / "config.pbtxt").write_text(text.replace("NAME", name))


@pytest.fixture(scope="module")
def schema_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("schema_repo")
    for name in ("plain", "triton_disabled", "sequence"):
        export_torch(Scale(), (torch.ones(2, 4),), ExportSpec(["x"], ["y"], max_batch_size=8), root, name)
    _write_config(root, "triton_disabled", DISABLED_FEATURES)
    sequence = DISABLED_FEATURES.replace("dynamic_batching { preserve_ordering: true }", REFUSED[0][0])
    _write_config(root, "sequence", sequence)
    export_torch(MatSquare(), (torch.ones(2, 2, 2),), ExportSpec(["x"], ["y"], max_batch_size=8), root, "square")
    _write_config(root, "square", """
name: "NAME"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] reshape { shape: [ 2, 2 ] } } ]
dynamic_batching { }
model_warmup [ { name: "w" batch_size: 2 count: 1
                 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } } ]
""")
    export_torch(
        Transpose(), (torch.ones(2, 3, 2, 2),),
        ExportSpec(["x"], ["y"], max_batch_size=8, dynamic_axes={"x": {0: "b", 1: "n"}, "y": {0: "b", 1: "n"}}),
        root, "blocks",
    )
    _write_config(root, "blocks", """
name: "NAME"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] reshape { shape: [ -1, 2, 2 ] } } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 4 ] reshape { shape: [ -1, 2, 2 ] } } ]
""")
    export_torch(MatSquare(), (torch.ones(2, 2, 2),), ExportSpec(["x"], ["y"], max_batch_size=8), root, "bad_reshape")
    _write_config(root, "bad_reshape", """
name: "NAME"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 5 ] reshape { shape: [ 2, 2 ] } } ]
""")
    ensemble = """
name: "NAME"
platform: "ensemble"
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] EXTRA } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [ { model_name: "plain" model_version: -1
                               input_map { key: "x" value: "x" } output_map { key: "y" value: "y" } } ] }
"""
    for name, extra, tail in (
        ("ensemble_ok", "", ""),
        ("ensemble_reshape", "reshape { shape: [ 2, 2 ] }", ""),
        ("ensemble_cache", "", "response_cache { enable: true }"),
    ):
        (root / name / "1").mkdir(parents=True)
        _write_config(root, name, ensemble.replace("EXTRA", extra) + tail)
    return root


@pytest.fixture(scope="module")
def schema_server(schema_repo: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    process = ServerProcess(
        schema_repo, tmp_path_factory.mktemp("schema_server"),
        "--model-control-mode", "explicit", "--load-model", "*", "--strict-readiness", "false",
    )
    yield process
    process.stop()


def _index(address: str) -> dict[str, tuple[str, str]]:
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        rows = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=60).models
    return {m.name: (m.state, m.reason) for m in rows}


def test_triton_config_with_disabled_features_loads_and_sequence_batching_is_refused(schema_server) -> None:  # type: ignore[no-untyped-def]
    index = _index(schema_server.address)
    assert index["triton_disabled"][0] == "READY"
    state, reason = index["sequence"]
    assert state == "UNAVAILABLE"
    assert "sequence_batching is not supported by ortserve" in reason
    client = grpcclient.InferenceServerClient(schema_server.address)
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    result = client.infer("triton_disabled", [x])
    np.testing.assert_allclose(result.as_numpy("y"), np.arange(4, dtype=np.float32).reshape(1, 4) * 2)
    config = client.get_model_config("triton_disabled").config
    assert config.dynamic_batching.preserve_ordering


def test_reshape_maps_the_wire_shape_to_the_model_shape(schema_server) -> None:  # type: ignore[no-untyped-def]
    client = grpcclient.InferenceServerClient(schema_server.address)
    rng = np.random.default_rng(3)
    data = rng.standard_normal((3, 4)).astype(np.float32)
    x = grpcclient.InferInput("x", [3, 4], "FP32")
    x.set_data_from_numpy(data)
    result = client.infer("square", [x]).as_numpy("y")
    blocks = data.reshape(3, 2, 2)
    assert result.shape == (3, 4)
    np.testing.assert_allclose(result, np.matmul(blocks, blocks).reshape(3, 4), rtol=1e-5, atol=1e-5)
    metadata = client.get_model_metadata("square")
    assert list(metadata.inputs[0].shape) == [-1, 4] and list(metadata.outputs[0].shape) == [-1, 4]
    # The model's shape is not what requests carry.
    wrong = grpcclient.InferInput("x", [3, 2, 2], "FP32")
    wrong.set_data_from_numpy(blocks)
    with pytest.raises(Exception, match="expects"):
        client.infer("square", [wrong])


def test_reshape_with_variable_dims(schema_server) -> None:  # type: ignore[no-untyped-def]
    client = grpcclient.InferenceServerClient(schema_server.address)
    data = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4)
    x = grpcclient.InferInput("x", [2, 5, 4], "FP32")
    x.set_data_from_numpy(data)
    result = client.infer("blocks", [x]).as_numpy("y")
    expected = (data.reshape(2, 5, 2, 2).transpose(0, 1, 3, 2) * 3).reshape(2, 5, 4)
    np.testing.assert_allclose(result, expected)


def test_reshape_that_does_not_fit_dims_is_refused_naming_reshape(schema_server) -> None:  # type: ignore[no-untyped-def]
    state, reason = _index(schema_server.address)["bad_reshape"]
    assert state == "UNAVAILABLE"
    assert "reshape" in reason and "[5]" in reason


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _override(**fields: object) -> dict[str, object]:
    return {"max_batch_size": 8, **fields}


_WARMUP_INPUT = {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}
# Each override asks for more than ortserve allows; the refusal names the field and the bound.
BOUNDS = [
    (_override(instance_group=[{"count": 1_000_000, "kind": "KIND_CPU"}]), "instance_group count"),
    (_override(instance_group=[{"count": 10_000}, {"count": 10_000}]), "instance_group count"),
    (_override(parameters={"intra_op_thread_count": {"string_value": "100000"}}), "intra_op_thread_count"),
    (_override(parameters={"inter_op_thread_count": {"string_value": "100000"}}), "inter_op_thread_count"),
    ({"max_batch_size": 2_000_000_000}, "max_batch_size"),
    (_override(dynamic_batching={"max_queue_delay_microseconds": "1000000000000"}), "max_queue_delay_microseconds"),
    (_override(dynamic_batching={"priority_levels": "1000000000000", "default_priority_level": "1"}),
     "priority_levels"),
    (_override(dynamic_batching={"preferred_batch_size": [1] * 100_000}), "preferred_batch_size"),
    (_override(dynamic_batching={"default_queue_policy": {"max_queue_size": 4_000_000_000}}), "max_queue_size"),
    (_override(dynamic_batching={"default_queue_policy": {"default_timeout_microseconds": "18000000000000000000"}}),
     "default_timeout_microseconds"),
    (_override(model_warmup=[{"name": "w", "batch_size": 1_000_000_000, "inputs": {"x": _WARMUP_INPUT}}]),
     "batch_size"),
    (_override(model_warmup=[{"name": "w", "batch_size": 16, "inputs": {"x": _WARMUP_INPUT}}]), "batch_size 16"),
    (_override(model_warmup=[{"name": "w", "batch_size": 1, "count": 1_000_000_000, "inputs": {"x": _WARMUP_INPUT}}]),
     "count"),
    (_override(model_warmup=[
        {"name": "w", "batch_size": 8, "inputs": {"x": {**_WARMUP_INPUT, "dims": [1_000_000_000]}}},
    ]), "elements"),
    (_override(model_warmup=[{"name": "w", "batch_size": 1, "inputs": {"x": _WARMUP_INPUT}}] * 1000),
     "model_warmup entries"),
]


def test_unbounded_config_values_are_refused_and_the_model_keeps_serving(schema_server) -> None:  # type: ignore[no-untyped-def]
    address = schema_server.address
    pid = schema_server.process.pid
    client = grpcclient.InferenceServerClient(address)
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    client.infer("plain", [x])
    baseline = _rss_bytes(pid)
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for config, field in BOUNDS:
            request = pb.RepositoryModelLoadRequest(model_name="plain")
            request.parameters["config"].string_param = json.dumps(config)
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
            assert field in err.value.details(), (field, err.value.details())
            assert "at most" in err.value.details() or "over max_batch_size" in err.value.details()
            # The version loaded before still serves.
            np.testing.assert_allclose(client.infer("plain", [x]).as_numpy("y"), np.full((1, 4), 2.0))
    # Nothing was built: the refusals come before any session or allocation.
    assert _rss_bytes(pid) - baseline < 200 * 2**20


def test_bounds_scale_with_the_machine() -> None:
    cpus = os.cpu_count() or 1
    assert model_config.max_instances() == max(4 * cpus, 16)
    assert model_config.max_threads() == max(4 * cpus, 64)
    config = parse_config(f"instance_group [ {{ count: {model_config.max_instances()} }} ]", ".pbtxt")
    model_config.check_supported(config)


def test_ensembles_get_the_same_config_checks(schema_server) -> None:  # type: ignore[no-untyped-def]
    index = _index(schema_server.address)
    assert index["ensemble_ok"][0] == "READY"
    state, reason = index["ensemble_cache"]
    assert state == "UNAVAILABLE" and "response_cache.enable is not supported by ortserve" in reason
    state, reason = index["ensemble_reshape"]
    assert state == "UNAVAILABLE" and "reshape on ensemble tensor(s) ['x']" in reason
