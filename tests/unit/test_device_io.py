"""The GPU path's I/O binding, batch-size buckets and padding (server/runtime/device_io.py), run on the
CPU provider: the same code the CUDA provider runs, without graph capture itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from server.core.errors import InvalidInputError, ModelLoadError
from server.repository.config import session_options
from server.repository.repository import parse_config
from server.runtime import onnx as ort_runtime
from server.runtime.device_io import BoundRunner, PinnedStaging, bucket_for, buckets

FEATURES = 6


def _model(feature_dim: int | str = FEATURES) -> bytes:
    """Y = relu(X @ W) (float32), C = argmax(Y) (int64), M = X > 0 (bool): three output types, batch dim N."""
    weights = np.random.default_rng(7).standard_normal((FEATURES, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["H"]),
            helper.make_node("Relu", ["H"], ["Y"]),
            helper.make_node("ArgMax", ["Y"], ["C"], axis=1, keepdims=0),
            helper.make_node("Greater", ["X", "Zero"], ["M"]),
        ],
        "bound",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", feature_dim])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("C", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("M", TensorProto.BOOL, ["N", feature_dim]),
        ],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.zeros(1, np.float32), "Zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _session(tmp_path: Path, model: bytes, **options: object) -> ort_runtime.OnnxRuntimeSession:
    settings = ort_runtime.SessionOptions()
    for key, value in options.items():
        setattr(settings, key, value)
    return ort_runtime.OnnxRuntimeSession(model, tmp_path, settings)


def _batch(rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"X": np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)}


def test_buckets_are_powers_of_two_up_to_the_max() -> None:
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(1) == [1]
    assert buckets(0) == [1]
    assert [bucket_for(n, buckets(12)) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    with pytest.raises(ValueError):
        bucket_for(13, buckets(12))


def test_bound_run_equals_a_plain_run(tmp_path: Path) -> None:
    model = _model()
    plain = _session(tmp_path, model, io_binding="off")
    bound = _session(tmp_path, model, io_binding="on")
    assert bound._bound is not None and plain._bound is None
    names = ["Y", "C", "M"]
    for seed, rows in enumerate((1, 3, 64, 2, 17)):  # the staging buffers grow, then are reused smaller
        feed = _batch(rows, seed)
        for got, want in zip(bound.run(feed, names), plain.run(feed, names), strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    assert bound.run(_batch(2, 9), ["C"])[0].shape == (2,)  # a subset of the outputs, in the order asked


def test_graph_buckets_pad_and_slice(tmp_path: Path) -> None:
    """Every batch size runs in its bucket (padded with zeros), and gives exactly what a plain run gives;
    a small batch after a large one sees none of the large one's rows."""
    model = _model()
    plain = _session(tmp_path, model, io_binding="off")
    bucketed = _session(tmp_path, model, io_binding="on", cuda_graphs=True, max_batch_size=8)
    assert bucketed._bound is not None and sorted(bucketed._bound._buckets) == [1, 2, 4, 8]
    names = ["Y", "C", "M"]
    for rows in (8, 3, 1, 5, 2, 7, 4, 6):
        feed = _batch(rows, 100 + rows)
        got, want = bucketed.run(feed, names), plain.run(feed, names)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_array_equal(g, w)


def test_graphs_refuse_a_dynamic_feature_dimension(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="fixed shapes apart from the batch dimension; 'X'"):
        _session(tmp_path, _model(feature_dim="F"), io_binding="on", cuda_graphs=True, max_batch_size=4)


def test_a_batch_that_does_not_fit_the_graph_is_refused(tmp_path: Path) -> None:
    session = _session(tmp_path, _model(), io_binding="on", cuda_graphs=True, max_batch_size=4)
    bad = {"X": np.zeros((2, FEATURES + 1), np.float32)}
    with pytest.raises(InvalidInputError, match="does not fit the model's CUDA graph"):
        session.run(bad, ["Y"])
    assert session.run(_batch(2, 1), ["Y"])[0].shape == (2, 5)  # and the session still serves


def test_string_models_run_without_binding(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["S"], ["T"])], "strings",
        [helper.make_tensor_value_info("S", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("T", TensorProto.STRING, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = _session(tmp_path, model.SerializeToString(), io_binding="on")
    assert session._bound is None
    out = session.run({"S": np.array([b"a", b"bc"], dtype=object)}, ["T"])[0]
    assert out.tolist() == [b"a", b"bc"]


def test_staging_without_cuda_is_ordinary_memory_and_reused() -> None:
    staging = PinnedStaging(pinned=False)
    first = staging.array("X", (4, 3), np.dtype(np.float32))
    second = staging.array("X", (2, 3), np.dtype(np.float32))
    assert not staging.pinned
    assert first.shape == (4, 3) and second.shape == (2, 3)
    assert np.shares_memory(first, second)  # a smaller batch reuses the buffer
    assert staging.array("X", (64, 3), np.dtype(np.float32)).shape == (64, 3)  # a larger one grows it
    staging.close()


def test_config_graphs_reach_the_session_options() -> None:
    config = parse_config("max_batch_size: 16\noptimization { cuda { graphs: true } }", ".pbtxt")
    options = session_options(config, "cpu")
    assert options.cuda_graphs is True and options.max_batch_size == 16
    assert options.io_binding == "auto"  # so on the CPU a model with graphs runs as before


def test_a_binding_that_disagrees_with_a_plain_run_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The load-time probe: a bound path that fails, or answers differently, is not used; the model serves."""
    model = _model()
    plain = _session(tmp_path, model, io_binding="off")
    feed, names = _batch(3, 5), ["Y", "C", "M"]
    want = plain.run(feed, names)

    def wrong(self: BoundRunner, inputs: object, output_names: list[str]) -> list[np.ndarray]:
        return [np.ones_like(w) for w in plain.run(_batch(1, 0), output_names)]

    def broken(self: BoundRunner, inputs: object, output_names: list[str]) -> list[np.ndarray]:
        raise RuntimeError("device says no")

    for replacement, reason in ((wrong, "output 'Y' differs from a plain run"), (broken, "device says no")):
        with monkeypatch.context() as patch:
            patch.setattr(BoundRunner, "run", replacement)
            caplog.clear()
            session = _session(tmp_path, model, io_binding="on")
        assert session._bound is None
        assert reason in caplog.text and "I/O binding not used" in caplog.text
        for got, expected in zip(session.run(feed, names), want, strict=True):
            np.testing.assert_array_equal(got, expected)


def test_a_model_the_probe_cannot_run_keeps_plain_runs(tmp_path: Path) -> None:
    """Zeros make this model fail (Gather at index 0 - 10, out of bounds), so the binding cannot be checked
    and is not used; real requests still run."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["I", "Offset"], ["J"]), helper.make_node("Gather", ["Table", "J"], ["Y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("I", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N"])],
        initializer=[numpy_helper.from_array(np.arange(3, dtype=np.float32), "Table"),
                     numpy_helper.from_array(np.array(-10, np.int64), "Offset")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = _session(tmp_path, model.SerializeToString(), io_binding="on")
    assert session._bound is None
    out = session.run({"I": np.array([10, 11, 12], np.int64)}, ["Y"])[0]
    np.testing.assert_array_equal(out, [0.0, 1.0, 2.0])
