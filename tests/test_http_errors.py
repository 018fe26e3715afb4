"""Bad input over HTTP: each gets the right status and an {"error": ...} body, and the next request is served."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import conftest
from tests.conftest import ServerProcess
from tests.gate import WAIT_S

GOOD = {"inputs": [{"name": "in_int32", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]}
INFER = "/v2/models/identity_int32/infer"


def _tensor(**fields: object) -> dict[str, object]:
    return {"inputs": [{"name": "in_int32", "datatype": "INT32", "shape": [1, 2], **fields}]}


def _binary(header: dict[str, object], raw: bytes, header_length: int | None = None) -> dict[str, object]:
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    return {"content": text + raw, "headers": {"Inference-Header-Content-Length": str(length)}}


def _int32_binary(size: int) -> dict[str, object]:
    tensor = {"name": "in_int32", "datatype": "INT32", "shape": [1, 2], "parameters": {"binary_data_size": size}}
    return {"inputs": [tensor]}


CASES = [
    # (name, request arguments, status, words in the message)
    ("malformed JSON", {"content": b'{"inputs": [', "headers": {}}, 400, "not valid JSON"),
    ("not an object", {"content": b"[1, 2]", "headers": {}}, 400, "JSON object"),
    ("data shorter than the shape", {"json": _tensor(data=[1])}, 400, "needs 2"),
    ("data longer than the shape", {"json": _tensor(data=[[1, 2, 3]])}, 400, "needs 2"),
    ("unknown datatype",
     {"json": {"inputs": [{"name": "in_int32", "datatype": "INT33", "shape": [2], "data": [1, 2]}]}},
     400, "unknown datatype"),
    ("string in an INT32 tensor", {"json": _tensor(data=["1", 2])}, 400, "integer"),
    ("value out of range", {"json": _tensor(data=[1, 1 << 40])}, 400, "range"),
    ("negative dimension",
     {"json": {"inputs": [{"name": "in_int32", "datatype": "INT32", "shape": [-1, 2], "data": []}]}},
     400, "negative"),
    ("no inputs", {"json": {"id": "x"}}, 400, "inputs"),
    ("header length past the body", _binary(_int32_binary(8), b"\0" * 8, header_length=10_000), 400, "only"),
    ("header length not a number", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "x"}}, 400,
     "integer"),
    ("binary sizes short of the data", _binary(_int32_binary(8), b"\0" * 12), 400, "add up"),
    ("binary size past the data", _binary(_int32_binary(16), b"\0" * 8), 400, "left"),
    ("binary size not the tensor's", _binary(_int32_binary(4), b"\0" * 4), 400, "needs 8"),
    ("BYTES prefix past the data", _binary(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": 6}}]},
        b"\xff\0\0\0ab"), 400, "runs past"),
    ("unknown input", {"json": {"inputs": [{"name": "zzz", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]}},
     400, "zzz"),
    ("bad classification", {"json": {**GOOD, "outputs": [{"name": "out_int32", "parameters": {"classification": -1}}]}},
     400, "classification"),
]


@pytest.mark.parametrize("name, arguments, status, words", CASES, ids=[c[0] for c in CASES])
def test_bad_infer_bodies(server: ServerProcess, name: str, arguments: dict, status: int, words: str) -> None:  # type: ignore[type-arg]
    model = "suffix" if "BYTES" in name else "identity_int32"
    answer = httpx.post(f"{server.http_url}/v2/models/{model}/infer", timeout=WAIT_S, **arguments)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    good = httpx.post(f"{server.http_url}{INFER}", json=GOOD, timeout=WAIT_S)
    assert good.status_code == 200 and good.json()["outputs"][0]["data"] == [1, 2]


def test_long_client_text_is_quoted_bounded(server: ServerProcess) -> None:
    answer = httpx.post(f"{server.http_url}{INFER}", json=_tensor(data=[1, 2], datatype="Q" * 100_000), timeout=WAIT_S)
    assert answer.status_code == 400 and len(answer.json()["error"]) < 1000


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/v2/nothing/here", 404),
        ("GET", "/v3", 404),
        ("POST", "/v2/health/ready", 405),
        ("GET", INFER, 405),
        ("GET", "/v2/models/no_such_model", 404),
        ("POST", "/v2/models/no_such_model/infer", 404),
        ("GET", "/v2/models/digits/versions/7", 404),
        ("GET", "/v2/models/digits/versions/x1", 400),
        ("GET", "/v2/models/broken", 503),
        ("POST", "/v2/repository/models/digits/load", 403),
    ],
)
def test_routes_methods_and_models(server: ServerProcess, method: str, path: str, status: int) -> None:
    body = GOOD if method == "POST" else None
    answer = httpx.request(method, f"{server.http_url}{path}", json=body, timeout=WAIT_S)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]
    if status == 405:
        assert answer.headers["allow"]


@pytest.fixture(scope="module")
def small_limit(
    repository: conftest.TestRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = ServerProcess(
        repository.path, tmp_path_factory.mktemp("http_limit"), "--strict-readiness", "false",
        "--http-max-body-bytes", "4096",
    )
    yield server
    assert server.stop() == 0, server.log()


def test_body_over_the_limit_is_413_before_it_is_read(small_limit: ServerProcess) -> None:
    """A Content-Length over the limit is answered at once: the test sends only the headers."""
    with socket.create_connection(("127.0.0.1", small_limit.http_port), timeout=WAIT_S) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 40}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, "the server closed without answering"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")
    good = httpx.post(f"{small_limit.http_url}{INFER}", json=GOOD, timeout=WAIT_S)
    assert good.status_code == 200


def test_chunked_body_over_the_limit_is_413(small_limit: ServerProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": [{"name": "in_int32", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}], "id": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}'

    answer = httpx.post(f"{small_limit.http_url}{INFER}", content=chunks(), timeout=WAIT_S)
    assert answer.status_code == 413 and "4096" in answer.json()["error"]
    under = httpx.post(f"{small_limit.http_url}{INFER}", json=GOOD, timeout=WAIT_S)
    assert under.status_code == 200


def test_http_off(repository: conftest.TestRepository, tmp_path: Path) -> None:
    server = ServerProcess(repository.path, tmp_path, "--strict-readiness", "false", "--allow-http", "false")
    try:
        assert server.http_port == 0 and not server.http_port_file.exists()
    finally:
        assert server.stop() == 0, server.log()
