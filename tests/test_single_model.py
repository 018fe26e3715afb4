"""`ortserve serve path/to/model.onnx`: one model served without a repository (issue 16)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, ServerProcess

DIGITS = ROOT / "model_repository" / "digits"


def ask(server: ServerProcess, model: str) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.address)
    image = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    image.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    result = client.infer(model, [image])
    client.close()
    return result.as_numpy("probabilities")


@pytest.fixture()
def serving(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        assert server.stop() == 0, server.log()


def start(started: list[ServerProcess], path: Path, workdir: Path, *flags: str) -> ServerProcess:
    workdir.mkdir()
    server = ServerProcess(path, workdir, *flags)
    started.append(server)
    return server


def test_an_onnx_file_is_served_under_its_folder_name_and_the_temporary_repository_is_removed(
    tmp_path: Path, serving: list[ServerProcess]
) -> None:
    server = start(serving, DIGITS / "1" / "model.onnx", tmp_path / "a")
    probabilities = ask(server, "digits")  # .../digits/1/model.onnx: named after the model folder
    assert probabilities.shape == (1, 10) and abs(float(probabilities.sum()) - 1) < 1e-4
    match = re.search(r"from the temporary repository (\S+)\)", server.log())
    assert match, server.log()
    temporary = Path(match.group(1))
    assert (temporary / "digits" / "1" / "model.onnx").is_file()
    assert server.stop() == 0, server.log()
    serving.remove(server)
    assert not temporary.exists()


def test_a_named_file_a_model_folder_and_a_folder_of_files(tmp_path: Path, serving: list[ServerProcess]) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(DIGITS / "1" / "model.onnx", loose / "classifier.onnx")
    named = start(serving, loose / "classifier.onnx", tmp_path / "b", "--model-name", "mnist")
    folder = start(serving, DIGITS, tmp_path / "c")  # a model directory: its config.pbtxt and version 1
    files = start(serving, loose, tmp_path / "d", "--model-name", "loose_model")  # a folder with one .onnx
    expected = ask(folder, "digits")
    np.testing.assert_allclose(ask(named, "mnist"), expected, rtol=1e-5)
    np.testing.assert_allclose(ask(files, "loose_model"), expected, rtol=1e-5)
    # The original files are untouched and still there.
    assert (loose / "classifier.onnx").is_file() and (DIGITS / "1" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-name", "bad name"], "invalid model name"),
        (["--model-name", "x", "--model-repository", str(ROOT / "model_repository")], "not both"),
    ],
)
def test_bad_single_model_command_lines(args: list[str], message: str) -> None:
    command = [sys.executable, "-m", "server", "serve", str(DIGITS / "1" / "model.onnx"), *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr


def test_model_name_with_a_repository_is_refused() -> None:
    command = [sys.executable, "-m", "server", "serve", str(ROOT / "model_repository"), "--model-name", "x"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "served alone" in result.stderr
