"""The committed example repository: served without torch-made-at-test-time models, and accurate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from exporters.models import digits
from tests.conftest import ROOT, ServerProcess


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    server = ServerProcess(ROOT / "model_repository", tmp_path_factory.mktemp("example"))
    yield server
    assert server.stop() == 0


def test_committed_digits_model_is_at_least_97_percent_accurate(example_server) -> None:
    _, x_test, _, y_test = digits.load_split(digits.DigitsConfig())
    client = grpcclient.InferenceServerClient(example_server.address)
    predictions = []
    for start in range(0, len(x_test), 64):
        batch = x_test[start : start + 64]
        tensor = grpcclient.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput("logits")])
        predictions.append(result.as_numpy("logits").argmax(1))
    accuracy = float((np.concatenate(predictions) == y_test).mean())
    assert accuracy >= 0.97, accuracy


@pytest.mark.parametrize("digit", [0, 3, 7, 9])
def test_predict_client_classifies_the_sample_images(example_server, digit: int) -> None:
    result = subprocess.run(
        [sys.executable, "clients/predict.py", "--url", example_server.address,
         "--image", f"clients/samples/digit_{digit}.png", "--top-k", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    top = result.stdout.strip().splitlines()[-1].split(":")
    assert top[-1] == str(digit), result.stdout


def test_predict_client_with_json_and_npy(example_server, tmp_path: Path) -> None:
    array = np.zeros((1, 8, 8), np.float32)
    np.save(tmp_path / "x.npy", array)
    for source in (["--npy", str(tmp_path / "x.npy")], ["--json", str(array.tolist())]):
        result = subprocess.run(
            [sys.executable, "clients/predict.py", "--url", example_server.address, *source],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "logits float32 [1, 10]" in result.stdout and "probabilities float32 [1, 10]" in result.stdout


def test_predict_client_reports_errors(example_server) -> None:
    result = subprocess.run(
        [sys.executable, "clients/predict.py", "--url", example_server.address, "--model", "nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr


@pytest.mark.parametrize("digit", [1, 4, 6])
def test_predict_client_through_the_pipeline(example_server, digit: int) -> None:
    result = subprocess.run(
        [sys.executable, "clients/predict.py", "--url", example_server.address, "--model", "digits_pipeline",
         "--image", f"clients/samples/digit_{digit}.png", "--top-k", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].split(":")[-1] == str(digit), result.stdout


def test_example_repository_is_fully_ready(example_server) -> None:
    client = grpcclient.InferenceServerClient(example_server.address)
    assert client.is_server_ready()  # strict readiness: every model loaded
    names = {m.name for m in client.get_model_repository_index().models if m.state == "READY"}
    assert names == {"digits", "digits_preprocess", "digits_pipeline", "digits_int8", "bytes_decoder"}
