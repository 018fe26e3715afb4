"""The Node.js client (clients/node) against a live server (issue 16): unary ModelInfer on `digits`, streaming
Generate on ortserve.v1.TextGeneration, and ModelStreamInfer with Triton's text convention on `bytes_decoder`.

Its dependencies come from `npm ci` in scripts/setup.sh (the full set-up). The reference answers come from
another client (tritonclient's unary ModelInfer), so the scripts are checked against the protocol, not against
themselves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, ServerProcess

NODE_DIR = ROOT / "clients" / "node"
# A sampled (not greedy) completion: the seed alone makes it repeatable, on every route.
SAMPLING = {"temperature": 0.8, "top_k": 40, "seed": 11, "ignore_eos": True}
PROMPT, MAX_TOKENS = "def ", 24
SAMPLING_FLAGS = ["--temperature", "0.8", "--top-k", "40", "--seed", "11", "--ignore-eos",
                  "--max-tokens", str(MAX_TOKENS)]


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The committed example repository: `digits` (the samples in clients/samples/) and `bytes_decoder`."""
    assert shutil.which("node"), "node is missing: run scripts/setup.sh"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "clients/node: run scripts/setup.sh (npm ci)"
    server = ServerProcess(ROOT / "model_repository", tmp_path_factory.mktemp("node_server"))
    yield server
    assert server.stop() == 0, server.log()


def node(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", script, *args], cwd=NODE_DIR, capture_output=True, text=True, timeout=120)


def unary_completion(server: ServerProcess) -> str:
    """The same request's whole completion from unary ModelInfer (Triton's convention, through tritonclient)."""
    tensors = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([PROMPT.encode()], dtype=object)),
        ("max_tokens", "INT32", np.array([MAX_TOKENS], np.int32)),
        ("sampling_parameters", "BYTES", np.array([json.dumps(SAMPLING).encode()], dtype=object)),
        ("exclude_input_in_output", "BOOL", np.array([True])),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client = grpcclient.InferenceServerClient(server.address)
    try:
        text = client.infer("bytes_decoder", tensors).as_numpy("text_output")[0].decode()
    finally:
        client.close()
    assert len(text) >= MAX_TOKENS // 2, text  # a real completion: byte tokens, mostly one character each
    return str(text)


@pytest.mark.parametrize("digit", [0, 3, 5, 8])
def test_infer_prints_the_digit_of_a_sample(example_server: ServerProcess, digit: int) -> None:
    result = node("infer.js", "--url", example_server.address, "--image", f"../samples/digit_{digit}.png")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"predicted: {digit}\n"
    assert result.stderr.startswith("logits: ") and len(result.stderr.split()) == 11  # the ten logits


def test_infer_reports_an_unknown_model(example_server: ServerProcess) -> None:
    result = node("infer.js", "--url", example_server.address, "--model", "nope")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == "error: NOT_FOUND: unknown model 'nope'"


def test_generate_streams_the_unary_completion(example_server: ServerProcess) -> None:
    expected = unary_completion(example_server)
    result = node("generate.js", "--url", example_server.address, *SAMPLING_FLAGS, PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + expected + "\n"
    assert result.stderr.strip() == f"[finish: length; prompt 4 tokens, completion {MAX_TOKENS} tokens]"


def test_stream_infer_streams_the_unary_completion_and_ends_with_the_final_flag(
    example_server: ServerProcess,
) -> None:
    expected = unary_completion(example_server)
    result = node("stream_infer.js", "--url", example_server.address, *SAMPLING_FLAGS, "--id", "n-7", PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + expected + "\n"
    # One response per streamed chunk plus the empty final one, which alone carries the flag.
    final = result.stderr.strip()
    assert final.startswith("[final response after ") and final.endswith(" responses; id n-7]"), final
    count = int(final.split()[3])
    assert 2 < count <= MAX_TOKENS + 1, final


def test_generate_reports_a_refused_setting(example_server: ServerProcess) -> None:
    result = node("generate.js", "--url", example_server.address, "--top-p", "0", PROMPT)
    assert result.returncode == 1
    assert "error: INVALID_ARGUMENT: " in result.stderr and "top_p" in result.stderr
