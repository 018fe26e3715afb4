"""The Python client stands alone (issue 16): nothing under clients/ imports the server, its generated modules
match protos/, its tensor codec agrees with the protocol, and the package installed into a bare virtual
environment (grpcio, protobuf, numpy, Pillow, nothing else) talks to a live server."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tritonclient.utils

from tests.conftest import ROOT, ServerProcess

CLIENTS = ROOT / "clients"
PACKAGE = CLIENTS / "python"
# Nothing of the repository but the client exists on a client machine.
REPOSITORY_PACKAGES = {"server", "exporters", "tests", "bench"}
# What a client machine installs: the package's dependencies and the `images` extra.
CLIENT_WHEELS = ("grpcio", "protobuf", "numpy", "pillow")

sys.path.insert(0, str(PACKAGE))  # the checkout's package, as clients/predict.py uses it
from ortserve_client import codec  # noqa: E402


def _imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in a file, and every import_module/__import__ of a constant name."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def test_nothing_under_clients_imports_the_server() -> None:
    files = [p for p in sorted(CLIENTS.rglob("*.py")) if "node_modules" not in p.parts]
    assert PACKAGE / "ortserve_client" / "predict.py" in files
    offending = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for line, module in _imported_modules(path)
        if module.split(".")[0] in REPOSITORY_PACKAGES
    ]
    assert not offending, offending


def _load_gen_stubs():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("client_gen_stubs", PACKAGE / "gen_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_up_to_date_with_protos(tmp_path: Path) -> None:
    written = _load_gen_stubs().generate(tmp_path / "pb")
    committed_dir = PACKAGE / "ortserve_client" / "pb"
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(committed) == sorted(fresh), "run: .venv/bin/python clients/python/gen_stubs.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale {stale}; run: .venv/bin/python clients/python/gen_stubs.py"


def test_client_package_passes_mypy_strict() -> None:
    # clients/python/pyproject.toml [tool.mypy]: strict, the generated modules checked through their stubs.
    command = [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull]
    result = subprocess.run(
        [*command, "ortserve_client", "gen_stubs.py"], cwd=PACKAGE, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_bytes_travel_with_a_four_byte_little_endian_length() -> None:
    array = np.array([[b"ab", b""], ["caf\u00e9", 7]], dtype=object)
    raw = codec.encode_raw(array, "BYTES")
    assert raw == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x05\x00\x00\x00caf\xc3\xa9" + b"\x01\x00\x00\x007"
    # Triton's own client library serializes the same bytes.
    expected = np.array([b"ab", b"", "café".encode(), b"7"], dtype=object)
    assert raw == tritonclient.utils.serialize_byte_tensor(expected).item()
    decoded = codec.decode_raw(raw, "BYTES", [2, 2])
    assert decoded.shape == (2, 2) and decoded.tolist() == [[b"ab", b""], ["café".encode(), b"7"]]


@pytest.mark.parametrize("datatype", [name for name in codec.NUMPY_DTYPES if name != "BYTES"])
def test_fixed_size_types_round_trip_little_endian(datatype: str) -> None:
    array = (np.arange(6).reshape(2, 3) % 2).astype(codec.NUMPY_DTYPES[datatype])
    raw = codec.encode_raw(array, datatype)
    assert raw == array.astype(codec.NUMPY_DTYPES[datatype].newbyteorder("<")).tobytes()
    assert codec.datatype_of(array) == datatype
    np.testing.assert_array_equal(codec.decode_raw(raw, datatype, [2, 3]), array)


def test_malformed_contents_are_refused_with_the_tensor_named() -> None:
    with pytest.raises(ValueError, match="'x'.*length prefix"):
        codec.decode_raw(b"\x01\x00", "BYTES", [1], "x")
    with pytest.raises(ValueError, match="'x'.*past the end"):
        codec.decode_raw(b"\x09\x00\x00\x00ab", "BYTES", [1], "x")
    with pytest.raises(ValueError, match="'y'.*12 bytes for FP32 shape \\[2, 2\\]"):
        codec.decode_raw(bytes(12), "FP32", [2, 2], "y")
    with pytest.raises(ValueError, match="no datatype"):
        codec.datatype_of(np.zeros(2, np.complex64))


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The committed example repository: `digits` (the samples in clients/samples/) and `bytes_decoder`."""
    server = ServerProcess(ROOT / "model_repository", tmp_path_factory.mktemp("standalone_server"))
    yield server
    assert server.stop() == 0, server.log()


def _pip(*args: str) -> None:
    """This environment's pip (it has the package index and the cache), quietly; fails the test on error."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding ortserve-client, the four client wheels and their own requirements only
    (grpcio needs typing-extensions); returns its python.

    The versions are those of this environment, so pip finds them in its cache. The wheel is built here from a
    copy of clients/python (a build in place would leave build/ in the checkout) with this environment's
    setuptools, and installs with --no-deps: what it declares cannot pull anything in.
    """
    start = time.monotonic()
    root = tmp_path_factory.mktemp("client_venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    source = root / "src"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _pip("wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(root / "wheels"))
    wheels = [f"{name}=={metadata.version(name)}" for name in CLIENT_WHEELS]
    _pip("--python", str(python), "install", *wheels)
    _pip("--python", str(python), "install", "--no-deps", *map(str, (root / "wheels").glob("*.whl")))
    print(f"client venv ready in {time.monotonic() - start:.1f} s")
    return python


def _run_in_venv(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd outside the checkout: `python -m` puts the working directory on sys.path, and the checkout has server/.
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_venv_has_the_client_and_nothing_of_the_server(client_venv: Path, tmp_path: Path) -> None:
    script = (
        "import importlib.util, sys\n"
        "import ortserve_client.predict, ortserve_client.generate\n"
        "assert 'PIL' not in sys.modules, 'Pillow must be optional'\n"
        "for name in ('server', 'onnxruntime', 'onnx', 'tritonclient', 'grpc_tools', 'torch'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "import importlib.metadata as m, re, json\n"
        "names = {d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()}\n"
        "wanted = {'ortserve-client', 'grpcio', 'protobuf', 'numpy', 'pillow'}\n"
        "required = {re.split(r'[^A-Za-z0-9._-]', r, maxsplit=1)[0].lower().replace('_', '-')\n"
        "            for name in wanted for r in (m.requires(name) or []) if 'extra ==' not in r}\n"
        "print(json.dumps({'wanted': sorted(wanted & names), 'other': sorted(names - wanted - required)}))\n"
    )
    result = _run_in_venv(client_venv, "-c", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {"wanted": ["grpcio", "numpy", "ortserve-client", "pillow", "protobuf"], "other": []}, found


@pytest.mark.parametrize("digit", [2, 5, 8])
def test_installed_predict_classifies_the_samples(
    client_venv: Path, example_server: ServerProcess, tmp_path: Path, digit: int
) -> None:
    image = CLIENTS / "samples" / f"digit_{digit}.png"
    result = _run_in_venv(
        client_venv, "-m", "ortserve_client.predict", "--url", example_server.address, "--image", str(image),
        "--top-k", "1", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "logits (top 1: score:index:label)"
    assert result.stdout.strip().splitlines()[-1].split(":")[1:] == [str(digit), str(digit)], result.stdout


def test_installed_predict_without_an_image_and_with_json(
    client_venv: Path, example_server: ServerProcess, tmp_path: Path
) -> None:
    bundled = _run_in_venv(client_venv, "-m", "ortserve_client.predict", "--url", example_server.address,
                           "--top-k", "1", cwd=tmp_path)
    assert bundled.returncode == 0, bundled.stderr
    assert bundled.stdout.strip().splitlines()[-1].endswith(":7:7"), bundled.stdout  # the bundled digit 7
    values = str(np.zeros((1, 8, 8)).tolist())
    raw = _run_in_venv(client_venv, "-m", "ortserve_client.predict", "--url", example_server.address,
                       "--json", values, cwd=tmp_path)
    assert raw.returncode == 0, raw.stderr
    assert "logits float32 [1, 10]" in raw.stdout and "probabilities float32 [1, 10]" in raw.stdout


def test_installed_generate_script_streams(client_venv: Path, example_server: ServerProcess, tmp_path: Path) -> None:
    script = client_venv.parent / "ortserve-generate"
    args = ("--url", example_server.address, "--temperature", "0", "--max-tokens", "12", "--ignore-eos", "def ")
    installed = subprocess.run([str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    assert "[finish: length; prompt 4 tokens, completion 12 tokens]" in installed.stderr
    # The checkout's wrapper runs the same code: the same greedy completion.
    wrapper = subprocess.run([sys.executable, "clients/generate.py", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert wrapper.returncode == 0, wrapper.stderr
    assert installed.stdout == wrapper.stdout and installed.stdout.startswith("def ")


def test_installed_predict_reports_rpc_errors(client_venv: Path, example_server: ServerProcess, tmp_path: Path) -> None:
    result = _run_in_venv(client_venv, "-m", "ortserve_client.predict", "--url", example_server.address,
                          "--model", "nope", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: NOT_FOUND: unknown model 'nope'"
