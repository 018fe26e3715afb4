"""Every Open Inference Protocol RPC through tritonclient, a client we did not write."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from exporters.models import digits


def test_live_ready_and_metadata(triton) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    metadata = triton.get_server_metadata()
    assert metadata.name == "ortserve"
    assert {"classification", "statistics", "model_configuration", "model_repository"} <= set(metadata.extensions)


def test_model_ready(triton) -> None:
    assert triton.is_model_ready("digits")
    assert triton.is_model_ready("digits", "1")
    assert not triton.is_model_ready("digits", "2")
    assert not triton.is_model_ready("no_such_model")
    assert not triton.is_model_ready("broken")


def test_model_metadata(triton) -> None:
    metadata = triton.get_model_metadata("digits")
    assert metadata.name == "digits"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, list(t.shape)) for t in metadata.outputs] == [("logits", [-1, 10]), ("probabilities", [-1, 10])]


def test_model_config_is_completed_from_the_graph(triton) -> None:
    config = triton.get_model_config("addsub").config
    assert config.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("a", [4]), ("b", [4])]
    assert config.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    digits_config = triton.get_model_config("digits").config
    assert digits_config.max_batch_size == 64
    assert digits_config.HasField("dynamic_batching")
    assert digits_config.output[0].label_filename == "labels.txt"


def test_repository_index_reports_the_broken_model(triton) -> None:
    index = {m.name: m for m in triton.get_model_repository_index().models}
    assert index["digits"].state == "READY" and index["digits"].version == "1"
    assert index["broken"].state == "UNAVAILABLE"
    assert "model.onnx is not an ONNX model" in index["broken"].reason
    ready_only = {m.name for m in triton.get_model_repository_index(as_json=False).models if m.state == "READY"}
    assert "broken" not in ready_only


def _digits_input(images: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return tensor


def test_digits_prediction_equals_pytorch(triton, repository) -> None:
    _, x_test, _, y_test = digits.load_split(digits.DigitsConfig())
    images = x_test[:64]
    result = triton.infer("digits", [_digits_input(images)], request_id="req-42")
    assert result.get_response().id == "req-42"
    with torch.no_grad():
        logits, probabilities = repository.digits_model(torch.from_numpy(images))
    np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities.numpy(), rtol=1e-4, atol=1e-5)
    assert (result.as_numpy("logits").argmax(1) == logits.numpy().argmax(1)).all()


def test_output_subset_and_classification(triton) -> None:
    _, x_test, _, y_test = digits.load_split(digits.DigitsConfig())
    outputs = [grpcclient.InferRequestedOutput("logits", class_count=3)]
    result = triton.infer("digits", [_digits_input(x_test[:4])], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["logits"]
    labels = result.as_numpy("logits")
    assert labels.shape == (4, 3)
    for row in labels:
        value, index, label = row[0].decode().split(":")
        assert int(index) == int(label)
        float(value)
    # The model is trained: most top-1 labels are right.
    assert sum(int(r[0].decode().split(":")[2]) == t for r, t in zip(labels, y_test[:4], strict=True)) >= 3


@pytest.mark.parametrize(
    "datatype",
    ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"],
)
def test_every_numeric_type_round_trips(triton, datatype: str) -> None:
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    rng = np.random.default_rng(0)
    if datatype == "BOOL":
        values = rng.integers(0, 2, (3, 2)).astype(bool)
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.array([[info.min, info.max], [0, 1], [2, info.max - 1]], dtype=dtype)
    else:
        values = rng.standard_normal((3, 2)).astype(dtype)
    name = datatype.lower()
    tensor = grpcclient.InferInput(f"in_{name}", [3, 2], datatype)
    tensor.set_data_from_numpy(values)
    result = triton.infer(f"identity_{name}", [tensor])
    out = result.as_numpy(f"out_{name}")
    assert out.dtype == values.dtype
    np.testing.assert_array_equal(out, values)


def test_bytes_tensors_raw(triton) -> None:
    values = np.array([["ab", "é"], ["", "x" * 1000]], dtype=object)
    tensor = grpcclient.InferInput("text", [2, 2], "BYTES")
    tensor.set_data_from_numpy(values)
    result = triton.infer("suffix", [tensor])
    expected = np.array([[b"ab!", "é!".encode()], [b"!", b"x" * 1000 + b"!"]], dtype=object)
    np.testing.assert_array_equal(result.as_numpy("joined"), expected)


TYPED_FIELDS = {
    "BOOL": ("bool_contents", [True, False]),
    "UINT8": ("uint_contents", [0, 255]),
    "UINT16": ("uint_contents", [0, 65535]),
    "UINT32": ("uint_contents", [0, 2**32 - 1]),
    "UINT64": ("uint64_contents", [0, 2**64 - 1]),
    "INT8": ("int_contents", [-128, 127]),
    "INT16": ("int_contents", [-32768, 32767]),
    "INT32": ("int_contents", [-(2**31), 2**31 - 1]),
    "INT64": ("int64_contents", [-(2**63), 2**63 - 1]),
    "FP32": ("fp32_contents", [1.5, -2.25]),
    "FP64": ("fp64_contents", [1e300, -0.5]),
    "BYTES": ("bytes_contents", [b"hello", b""]),
}


@pytest.mark.parametrize("datatype", sorted(TYPED_FIELDS))
def test_typed_contents(stub, datatype: str) -> None:
    """Contents in InferTensorContents instead of raw bytes; the response comes back raw."""
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    field, values = TYPED_FIELDS[datatype]
    name = datatype.lower()
    request = service_pb2.ModelInferRequest(model_name=f"identity_{name}")
    tensor = request.inputs.add(name=f"in_{name}", datatype=datatype, shape=[1, 2])
    getattr(tensor.contents, field).extend(values)
    response = stub.ModelInfer(request)
    assert response.outputs[0].datatype == datatype and list(response.outputs[0].shape) == [1, 2]
    raw = response.raw_output_contents[0]
    if datatype == "BYTES":
        assert list(deserialize_bytes_tensor(raw)) == values
    else:
        assert np.frombuffer(raw, triton_to_np_dtype(datatype)).tolist() == values


def test_typed_contents_on_a_single_type_model(stub) -> None:
    request = service_pb2.ModelInferRequest(model_name="addsub", id="typed")
    request.inputs.add(name="a", datatype="FP32", shape=[4]).contents.fp32_contents.extend([1, 2, 3, 4])
    request.inputs.add(name="b", datatype="FP32", shape=[4]).contents.fp32_contents.extend([1, 1, 1, 1])
    response = stub.ModelInfer(request)
    assert response.id == "typed"
    outputs = {
        o.name: np.frombuffer(raw, np.float32)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    np.testing.assert_array_equal(outputs["sum"], [2, 3, 4, 5])
    np.testing.assert_array_equal(outputs["difference"], [0, 1, 2, 3])


def test_bytes_typed_contents(stub) -> None:
    request = service_pb2.ModelInferRequest(model_name="suffix")
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 2]).contents.bytes_contents.extend([b"a", b"bc"])
    response = stub.ModelInfer(request)
    raw = response.raw_output_contents[0]
    assert raw == b"\x02\x00\x00\x00a!\x03\x00\x00\x00bc!"


def test_statistics_count_requests(triton) -> None:
    before = triton.get_inference_statistics("addsub").model_stats[0]
    a = grpcclient.InferInput("a", [4], "FP32")
    a.set_data_from_numpy(np.ones(4, np.float32))
    b = grpcclient.InferInput("b", [4], "FP32")
    b.set_data_from_numpy(np.ones(4, np.float32))
    for _ in range(3):
        triton.infer("addsub", [a, b])
    after = triton.get_inference_statistics("addsub").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 3
    assert after.execution_count == before.execution_count + 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    everything = {s.name for s in triton.get_inference_statistics().model_stats}
    assert {"digits", "addsub", "identity_fp32"} <= everything


def test_model_stream_infer(triton) -> None:
    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(5):
            a = grpcclient.InferInput("a", [4], "FP32")
            a.set_data_from_numpy(np.full(4, i, np.float32))
            b = grpcclient.InferInput("b", [4], "FP32")
            b.set_data_from_numpy(np.ones(4, np.float32))
            triton.async_stream_infer("addsub", [a, b], request_id=str(i))
        bad = grpcclient.InferInput("a", [5], "FP32")
        bad.set_data_from_numpy(np.ones(5, np.float32))
        triton.async_stream_infer("addsub", [bad, b], request_id="bad")
        got = [results.get(timeout=30) for _ in range(6)]
    finally:
        triton.stop_stream()
    for i, (result, error) in enumerate(got[:5]):
        assert error is None
        assert result.get_response().id == str(i)
        np.testing.assert_array_equal(result.as_numpy("sum"), np.full(4, i + 1, np.float32))
        assert result.get_response().parameters["triton_final_response"].bool_param
    result, error = got[5]
    assert result is None and isinstance(error, InferenceServerException)
    assert "shape" in str(error)
