"""Request logs through real clients: JSON lines, a request id on every request-level line, the access log,
no request content in the log, and hostile ids cut to something safe to echo and log.

Three servers over one small repository (a BYTES and an FP32 identity model and the byte-level text
decoder): JSON lines with the access log (most tests), text lines with the access log, and text lines
with the default (no access log). Every test picks its own unique ids and markers, so the tests share
the servers without depending on each other's lines; the log is polled for the lines a test expects,
since the access line is written after the answer has left.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from exporters.export import ExportSpec
from exporters.graphs import export_graph, identity_model
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.pb import grpc_service_pb2_grpc as pb_grpc
from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_pb_grpc
from tests.conftest import ROOT, ServerProcess

WAIT_S = 120
ACCESS = "ortserve.access"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_ID = 128
# What uvicorn's own logging handler writes when its HTTP parser refuses a request. It is not a JSON
# line: uvicorn installs its own handler on its `uvicorn` logger (propagate off) instead of going
# through the server's root handler. Listed here by its exact text so that it is tolerated knowingly,
# never any other line; test_uvicorn_lines_are_json_too pins the bug.
UVICORN_REFUSAL = "WARNING:  Invalid HTTP request received."


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --- the servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository that loads in a moment: no trained model, just what these tests send to."""
    root = tmp_path_factory.mktemp("log_repo")
    shutil.copytree(ROOT / "model_repository" / "bytes_decoder", root / "bytes_decoder")
    for datatype in ("BYTES", "FP32"):
        export_graph(
            identity_model([datatype], ["batch", 2]), ExportSpec([], [], max_batch_size=8), root,
            f"identity_{datatype.lower()}",
        )
    return root


def _serve(repository: Path, workdir: Path, *extra: str) -> Iterator[ServerProcess]:
    process = ServerProcess(repository, workdir, *extra)
    yield process
    code = process.stop()
    assert code == 0, f"server exited with {code}:\n{process.log()}"


@pytest.fixture(scope="module")
def json_server(log_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(
        log_repository, tmp_path_factory.mktemp("json_server"), "--log-format", "json", "--log-requests", "true"
    )


@pytest.fixture(scope="module")
def text_server(log_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _serve(log_repository, tmp_path_factory.mktemp("text_server"), "--log-requests", "true")


@pytest.fixture(scope="module")
def quiet_server(log_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Default logging: text lines, no access log."""
    yield from _serve(log_repository, tmp_path_factory.mktemp("quiet_server"))


@pytest.fixture(scope="module")
def http(json_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=json_server.http_url, timeout=WAIT_S) as client:
        yield client


@pytest.fixture(scope="module")
def triton(json_server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(json_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(json_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(json_server.address) as chan:
        yield chan


# --- reading the log ---------------------------------------------------------------------------------


def parse(line: str) -> dict[str, Any] | None:
    """The line's JSON object, or None when it is not one."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def entries(server: ServerProcess) -> list[dict[str, Any]]:
    """The log's JSON lines (the others are the business of the format tests)."""
    return [e for e in map(parse, server.log().splitlines()) if e is not None]


def wait_for(server: ServerProcess, found: Callable[[str], bool], what: str) -> str:
    """The whole log once some line of it satisfies `found`."""
    deadline = time.monotonic() + WAIT_S
    while True:
        log = server.log()
        if any(found(line) for line in log.splitlines()):
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line with {what} within {WAIT_S}s:\n{log[-4000:]}")
        time.sleep(0.05)


def access_line(server: ServerProcess, rid: str) -> dict[str, Any]:
    """The access line of request `rid` (JSON server), once written."""

    def found(line: str) -> bool:
        entry = parse(line)
        return entry is not None and entry["logger"] == ACCESS and entry.get("request_id") == rid

    wait_for(server, found, f"the access line of request {rid!r}")
    return next(e for e in entries(server) if e["logger"] == ACCESS and e.get("request_id") == rid)


def lines_of(server: ServerProcess, rid: str) -> list[dict[str, Any]]:
    """Every JSON line of request `rid`, read once its access line (its last line) is written."""
    access_line(server, rid)
    return [e for e in entries(server) if e.get("request_id") == rid]


def error_line(lines: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [e for e in lines if e["logger"] != ACCESS]
    assert len(errors) == 1, lines
    return errors[0]


# --- the requests ------------------------------------------------------------------------------------


def fp32_input(shape: list[int]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("in_fp32", shape, "FP32")
    tensor.set_data_from_numpy(np.zeros(shape, np.float32))
    return tensor


def fp32_request(shape: list[int], rid: str = "") -> pb.ModelInferRequest:
    """A raw ModelInferRequest to identity_fp32 (zeros), for the plain stub that reads trailing metadata."""
    request = pb.ModelInferRequest(model_name="identity_fp32", id=rid)
    tensor = request.inputs.add(name="in_fp32", datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend([0.0] * int(np.prod(shape)))
    return request


def trailing_id(call: grpc.Call) -> str:
    ids = [value for key, value in call.trailing_metadata() or () if key == "x-request-id"]
    assert len(ids) == 1, call.trailing_metadata()
    return str(ids[0])


def raw_http(server: ServerProcess, request_id: bytes) -> tuple[int, dict[bytes, bytes]]:
    """GET of an unknown model's metadata with `request_id` as X-Request-Id, bytes as given (no client
    library checks them); the answer's status and headers."""
    request = (
        b"GET /v2/models/" + unique("nope").encode() + b" HTTP/1.1\r\nHost: test\r\nX-Request-Id: " + request_id
        + b"\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=WAIT_S) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    headers = {}
    for line in head[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


def text_inputs(prompt: str, max_tokens: int) -> list[grpcclient.InferInput]:
    """Triton's text-generation inputs (the decoupled model, through ModelStreamInfer)."""
    tensors = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([prompt.encode()], dtype=object)),
        ("max_tokens", "INT32", np.array([max_tokens], np.int32)),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


# --- 2. an HTTP request with X-Request-Id ------------------------------------------------------------


def test_http_request_id_header_is_echoed_and_on_every_line(json_server: ServerProcess, http: httpx.Client) -> None:
    rid, model = unique("http-header"), unique("no_such_model")
    answer = http.post(f"/v2/models/{model}/infer", json={"inputs": []}, headers={"X-Request-Id": rid})
    assert answer.status_code == 404 and answer.headers["x-request-id"] == rid
    lines = lines_of(json_server, rid)
    error = error_line(lines)
    assert error["logger"] == "server.http.errors" and model in error["message"]
    access = access_line(json_server, rid)
    assert access["protocol"] == "HTTP"
    assert "/v2/models/{name}/infer" in access["method"] and access["method"].startswith("POST")
    assert access["model"] == model and access["status"] == "404"
    assert isinstance(access["duration_ms"], (int, float)) and access["duration_ms"] >= 0
    assert access["level"] == "INFO"


# --- 3. HTTP without an id: a generated one; a KServe body's id ----------------------------------------


def test_http_without_id_gets_a_generated_one_that_the_log_carries(
    json_server: ServerProcess, http: httpx.Client
) -> None:
    models = [unique("no_such_model") for _ in range(2)]
    ids = []
    for model in models:
        answer = http.get(f"/v2/models/{model}")
        assert answer.status_code == 404
        ids.append(answer.headers["x-request-id"])
    assert all(ids) and ids[0] != ids[1], ids
    for rid, model in zip(ids, models, strict=True):
        lines = lines_of(json_server, rid)
        assert model in error_line(lines)["message"]
        assert access_line(json_server, rid)["model"] == model
        # Every line that names this request's model is one of its lines.
        assert all(e.get("request_id") == rid for e in entries(json_server) if model in e["message"])


def test_a_successful_http_request_gets_an_id_too(json_server: ServerProcess, http: httpx.Client) -> None:
    answer = http.get("/v2/health/ready")
    assert answer.status_code == 200
    rid = answer.headers["x-request-id"]
    access = access_line(json_server, rid)
    assert access["status"] == "200" and access["method"] == "GET /v2/health/ready" and access["model"] == ""


def test_kserve_infer_body_id_is_the_request_id(json_server: ServerProcess, http: httpx.Client) -> None:
    rid = unique("body-id")
    # Valid JSON tensors of the wrong shape: decoded (so the id is read), then refused by the model.
    body = {"id": rid, "inputs": [{"name": "in_fp32", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    answer = http.post("/v2/models/identity_fp32/infer", json=body)
    assert answer.status_code == 400 and answer.json()["error"].startswith("input 'in_fp32' has shape")
    assert answer.headers["x-request-id"] == rid
    lines = lines_of(json_server, rid)
    assert "expects" in error_line(lines)["message"]
    access = access_line(json_server, rid)
    assert access["model"] == "identity_fp32" and access["status"] == "400"


def test_generate_body_id_is_the_request_id(json_server: ServerProcess, http: httpx.Client) -> None:
    rid = unique("generate-id")
    answer = http.post("/v2/models/bytes_decoder/generate", json={"id": rid, "text_input": "hi", "max_tokens": -1})
    assert answer.status_code == 400 and answer.headers["x-request-id"] == rid
    lines = lines_of(json_server, rid)
    assert "max_tokens" in error_line(lines)["message"]
    access = access_line(json_server, rid)
    assert access["method"] == "POST /v2/models/{name}/generate" and access["model"] == "bytes_decoder"


def test_kserve_body_id_survives_a_body_that_does_not_decode(
    json_server: ServerProcess, http: httpx.Client
) -> None:
    rid = unique("undecoded-body-id")
    body = {"id": rid, "inputs": [{"name": "in_fp32", "shape": [1, 2], "datatype": "FP32", "data": ["x", "y"]}]}
    answer = http.post("/v2/models/identity_fp32/infer", json=body)
    assert answer.status_code == 400
    assert answer.headers["x-request-id"] == rid


# --- 4. gRPC ---------------------------------------------------------------------------------------


def test_grpc_request_id_is_on_the_error_and_access_lines(
    json_server: ServerProcess, triton: grpcclient.InferenceServerClient
) -> None:
    rid = unique("grpc-id")
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("identity_fp32", [fp32_input([1, 3])], request_id=rid)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    lines = lines_of(json_server, rid)
    error = error_line(lines)
    assert error["logger"] == "server.rpc.status" and "in_fp32" in error["message"]
    access = access_line(json_server, rid)
    assert access["protocol"] == "gRPC" and access["method"] == MODEL_INFER
    assert access["model"] == "identity_fp32" and access["status"] == "INVALID_ARGUMENT"
    assert isinstance(access["duration_ms"], (int, float)) and access["duration_ms"] >= 0


def test_grpc_without_id_sends_the_generated_one_back(json_server: ServerProcess, channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    _, call = stub.ModelInfer.with_call(fp32_request([1, 2]))
    rid = trailing_id(call)
    assert rid
    access = access_line(json_server, rid)
    assert access["status"] == "OK" and access["model"] == "identity_fp32" and access["method"] == MODEL_INFER
    # A failing call too: its error line carries the id the trailing metadata gives.
    model = unique("no_such_model")
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer.with_call(pb.ModelInferRequest(model_name=model))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    failed_id = trailing_id(raised.value)
    assert failed_id and failed_id != rid
    assert model in error_line(lines_of(json_server, failed_id))["message"]
    assert access_line(json_server, failed_id)["status"] == "NOT_FOUND"


def test_grpc_metadata_id_is_the_request_id(json_server: ServerProcess, channel: grpc.Channel) -> None:
    rid = unique("grpc-metadata")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    _, call = stub.ModelInfer.with_call(fp32_request([1, 2]), metadata=(("x-request-id", rid),))
    assert trailing_id(call) == rid
    assert access_line(json_server, rid)["status"] == "OK"


def test_grpc_generate_access_line_names_the_model(json_server: ServerProcess, channel: grpc.Channel) -> None:
    rid = unique("generate-model")
    stub = gen_pb_grpc.TextGenerationStub(channel)
    request = gen_pb.GenerateRequest(model="bytes_decoder", prompt="hi", max_tokens=2)
    list(stub.Generate(request, metadata=(("x-request-id", rid),)))
    assert access_line(json_server, rid)["model"] == "bytes_decoder"


# --- 5. no request content in the log --------------------------------------------------------------


def _http_requests_with(http: httpx.Client, marker: str, ids: list[str]) -> None:
    """KServe JSON and binary tensors, generate, and the OpenAI routes, each once accepted and once refused."""

    def post(path: str, body: dict[str, Any], expected: int) -> None:
        rid = unique("content-http")
        ids.append(rid)
        answer = http.post(path, json=body, headers={"X-Request-Id": rid})
        assert answer.status_code == expected, (path, answer.text)

    data = [marker, marker + " second"]
    good = {"name": "in_bytes", "shape": [1, 2], "datatype": "BYTES", "data": data}
    post("/v2/models/identity_bytes/infer", {"inputs": [good]}, 200)
    post("/v2/models/identity_bytes/infer", {"inputs": [{**good, "shape": [1, 3], "data": [*data, marker]}]}, 400)
    post("/v2/models/identity_bytes/infer", {"inputs": [{**good, "shape": [2, 2]}]}, 400)
    post("/v2/models/identity_fp32/infer", {"inputs": [{**good, "name": "in_fp32", "datatype": "FP32"}]}, 400)
    post("/v2/models/identity_fp32/infer", {"inputs": [{**good, "name": "in_fp32"}]}, 400)
    post("/v2/models/bytes_decoder/generate", {"text_input": marker, "max_tokens": 2}, 200)
    post("/v2/models/bytes_decoder/generate", {"text_input": marker, "max_tokens": 0}, 400)
    post("/v2/models/bytes_decoder/generate_stream", {"text_input": marker, "max_tokens": 2}, 200)
    post("/v2/models/bytes_decoder/generate", {"text_input": marker * 40, "max_tokens": 2}, 400)
    post("/v1/completions", {"model": "bytes_decoder", "prompt": marker, "max_tokens": 2}, 200)
    post("/v1/completions", {"model": "bytes_decoder", "prompt": marker, "max_tokens": 2, "stream": True}, 200)
    post("/v1/completions", {"model": "bytes_decoder", "prompt": marker, "max_tokens": -2}, 400)
    post("/v1/completions", {"model": "bytes_decoder", "prompt": [marker, 7], "max_tokens": 2}, 400)
    chat = {"model": "bytes_decoder", "messages": [{"role": "user", "content": marker}], "max_tokens": 2}
    post("/v1/chat/completions", chat, 200)
    post("/v1/chat/completions", {**chat, "temperature": -1}, 400)
    parts = [{"type": "text", "text": marker}, {"type": "image_url", "image_url": {"url": marker}}]
    post("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": parts}]}, 400)
    # An unknown role is quoted in the error (a field value, like a model name); the text is not.
    post("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": marker}]}, 400)


def _binary_requests_with(json_server: ServerProcess, marker: str, ids: list[str]) -> None:
    """Triton's binary tensor extension (tritonclient.http), accepted and refused."""
    client = httpclient.InferenceServerClient(json_server.http_address)
    try:
        for model, shape, ok in (
            ("identity_bytes", [1, 2], True), ("identity_bytes", [2, 1], False), ("identity_fp32", [1, 2], False)
        ):
            rid = unique("content-binary")
            ids.append(rid)
            tensor = httpclient.InferInput("in_bytes", shape, "BYTES")
            tensor.set_data_from_numpy(np.array([marker.encode()] * 2, dtype=object).reshape(shape), binary_data=True)
            if ok:
                client.infer(model, [tensor], request_id=rid, headers={"X-Request-Id": rid})
            else:
                with pytest.raises(InferenceServerException):
                    client.infer(model, [tensor], request_id=rid, headers={"X-Request-Id": rid})
    finally:
        client.close()


def _grpc_requests_with(
    triton: grpcclient.InferenceServerClient, channel: grpc.Channel, marker: str, ids: list[str]
) -> None:
    """ModelInfer (BYTES), ModelStreamInfer (text generation) and Generate, accepted and refused."""
    for shape, ok in (([1, 2], True), ([1, 1], False)):
        rid = unique("content-grpc")
        ids.append(rid)
        tensor = grpcclient.InferInput("in_bytes", shape, "BYTES")
        tensor.set_data_from_numpy(np.array([marker.encode()] * int(np.prod(shape)), dtype=object).reshape(shape))
        if ok:
            triton.infer("identity_bytes", [tensor], request_id=rid)
        else:
            with pytest.raises(InferenceServerException):
                triton.infer("identity_bytes", [tensor], request_id=rid)
    stub = gen_pb_grpc.TextGenerationStub(channel)
    for max_tokens, ok in ((2, True), (-2, False)):
        rid = unique("content-generate")
        ids.append(rid)
        request = gen_pb.GenerateRequest(model="bytes_decoder", prompt=marker, max_tokens=max_tokens)
        if ok:
            list(stub.Generate(request, metadata=(("x-request-id", rid),)))
        else:
            with pytest.raises(grpc.RpcError):
                list(stub.Generate(request, metadata=(("x-request-id", rid),)))
    _stream_requests_with(triton, marker, ids)


def _stream_requests_with(triton: grpcclient.InferenceServerClient, marker: str, ids: list[str]) -> None:
    """Text generation through tritonclient's stream: one answered, one refused (max_tokens 0)."""
    results: list[Any] = []
    rid = unique("content-stream")
    ids.append(rid)
    triton.start_stream(lambda result, error: results.append(error or result), headers={"x-request-id": rid})
    try:
        for max_tokens in (2, 0):
            triton.async_stream_infer("bytes_decoder", text_inputs(marker, max_tokens), request_id=unique("msg"))
    finally:
        triton.stop_stream()
    assert any(isinstance(r, InferenceServerException) for r in results), results


def test_no_request_content_reaches_the_log(
    json_server: ServerProcess, http: httpx.Client, triton: grpcclient.InferenceServerClient,
    channel: grpc.Channel,
) -> None:
    marker = unique("SECRETCANARY")
    ids: list[str] = []
    _http_requests_with(http, marker, ids)
    _binary_requests_with(json_server, marker, ids)
    _grpc_requests_with(triton, channel, marker, ids)
    for rid in ids:
        access_line(json_server, rid)
    log = json_server.log()
    leaks = [line for line in log.splitlines() if "SECRETCANARY" in line]
    assert not leaks, "request content in the log:\n" + "\n".join(leaks)


# --- 7. hostile ids --------------------------------------------------------------------------------


def test_a_long_request_id_is_cut(json_server: ServerProcess, http: httpx.Client) -> None:
    given = "L" * 2000
    answer = http.get(f"/v2/models/{unique('no_such_model')}", headers={"X-Request-Id": given})
    assert answer.status_code == 404 and answer.headers["x-request-id"] == given[:MAX_ID]
    lines = lines_of(json_server, given[:MAX_ID])
    assert len(lines) == 2 and all(len(e["request_id"]) == MAX_ID for e in lines)
    assert given[: MAX_ID + 1] not in json_server.log()


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (b"tab\there", "tabhere"),
        (b"nel\x85nbsp\xa0csi\x9b[31mend", "nelnbspcsi[31mend"),
        (b"\t\x85\xa0", ""),  # nothing printable left: a generated id
        (b"\x01start" + b"k" * 300, None),
        (b"del\x7fesc\x1b[2J", None),
        (b"bare\nX-Forged: 1", None),
        (b"cr\rX-Forged: 1", None),
        (b"nul\x00", None),
    ],
)
def test_control_characters_never_reach_the_answer_or_the_log(
    json_server: ServerProcess, given: bytes, kept: str | None
) -> None:
    """Control characters are dropped from the id; where the HTTP parser refuses the header itself (400,
    before the application: kept is None), the server goes on serving."""
    status, headers = raw_http(json_server, given)
    if kept is None:
        assert status == 400 and b"x-request-id" not in headers, (status, headers)
    else:
        assert status == 404
        echoed = headers[b"x-request-id"].decode("latin-1")
        assert 0 < len(echoed) <= MAX_ID and echoed.isprintable()
        if kept:
            assert echoed == kept
        assert all(e["request_id"] == echoed for e in lines_of(json_server, echoed))
    # Still serving, on a new connection.
    rid = unique("after-hostile")
    status, headers = raw_http(json_server, rid.encode())
    assert status == 404 and headers[b"x-request-id"] == rid.encode()


def test_hostile_grpc_ids_are_cut(json_server: ServerProcess, channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    given = "G" * 2000
    _, call = stub.ModelInfer.with_call(fp32_request([1, 2]), metadata=(("x-request-id", given),))
    assert trailing_id(call) == given[:MAX_ID]
    assert access_line(json_server, given[:MAX_ID])["status"] == "OK"
    # In the message, where nothing checks it on the way: control characters, a newline, 2000 characters.
    suffix = unique("")
    stub.ModelInfer.with_call(fp32_request([1, 2], rid=f"m\x1b[31m\nFORGED\x00{suffix}" + "x" * 2000))
    expected = f"m[31mFORGED{suffix}" + "x" * (MAX_ID - len(f"m\x1b[31m\nFORGED\x00{suffix}"))
    assert access_line(json_server, expected)["status"] == "OK"


# --- 6. text lines ---------------------------------------------------------------------------------


def text_lines_of(server: ServerProcess, rid: str, count: int) -> list[str]:
    """The text lines that end with request `rid`'s tag, once there are `count` of them."""
    tag = f" [request_id={rid}]"

    def enough(log: str) -> bool:
        return sum(line.endswith(tag) for line in log.splitlines()) >= count

    deadline = time.monotonic() + WAIT_S
    while not enough(log := server.log()):
        assert time.monotonic() < deadline, f"fewer than {count} lines end with {tag!r}:\n{log[-4000:]}"
        time.sleep(0.05)
    return [line for line in log.splitlines() if line.endswith(tag)]


def test_text_lines_end_with_the_request_id(text_server: ServerProcess) -> None:
    rid, model = unique("text-id"), unique("no_such_model")
    answer = httpx.get(f"{text_server.http_url}/v2/models/{model}", headers={"X-Request-Id": rid}, timeout=WAIT_S)
    assert answer.status_code == 404 and answer.headers["x-request-id"] == rid
    lines = text_lines_of(text_server, rid, 2)
    assert len(lines) == 2
    assert any(" INFO server.http.errors: " in line and model in line for line in lines), lines
    assert any(f" INFO {ACCESS}: HTTP GET /v2/models/{{name}} model={model} status=404 " in line for line in lines)
    # Every line naming the model is one of this request's lines.
    assert all(line.endswith(f" [request_id={rid}]") for line in text_server.log().splitlines() if model in line)


def test_text_lines_of_a_grpc_request(text_server: ServerProcess) -> None:
    rid = unique("text-grpc")
    with grpc.insecure_channel(text_server.address) as chan:
        with pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(fp32_request([1, 3], rid=rid))
    lines = text_lines_of(text_server, rid, 2)
    assert any(f"{ACCESS}: gRPC {MODEL_INFER} model=identity_fp32 status=INVALID_ARGUMENT" in line for line in lines)


def test_a_client_id_cannot_forge_text_lines(text_server: ServerProcess) -> None:
    """A newline in an id (gRPC message, KServe body) would start a line of the client's making."""
    forged = unique("FORGED")
    rid = unique("forge")
    with grpc.insecure_channel(text_server.address) as chan:
        stub = pb_grpc.GRPCInferenceServiceStub(chan)
        stub.ModelInfer(fp32_request([1, 2], rid=f"{rid}\n{forged} ERROR fake: line\r\x1b[2K"))
    body = {"id": f"{rid}-body\n{forged} ERROR fake", "inputs": [{"name": "in_fp32", "shape": [1, 3],
                                                                   "datatype": "FP32", "data": [1, 2, 3]}]}
    answer = httpx.post(f"{text_server.http_url}/v2/models/identity_fp32/infer", json=body, timeout=WAIT_S)
    assert answer.status_code == 400
    text_lines_of(text_server, f"{rid}{forged} ERROR fake: line[2K", 1)
    text_lines_of(text_server, f"{rid}-body{forged} ERROR fake", 2)
    assert not [line for line in text_server.log().splitlines() if line.startswith(forged)]


def test_no_access_lines_by_default(quiet_server: ServerProcess) -> None:
    rid = unique("quiet")
    answer = httpx.get(f"{quiet_server.http_url}/v2/models/{unique('no_such_model')}",
                       headers={"X-Request-Id": rid}, timeout=WAIT_S)
    assert answer.status_code == 404 and answer.headers["x-request-id"] == rid
    with grpc.insecure_channel(quiet_server.address) as chan:
        pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(fp32_request([1, 2]))
        with pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(fp32_request([1, 3], rid=rid + "-grpc"))
    # The error lines are the last each request writes; once both are there, an access line would be too.
    text_lines_of(quiet_server, rid, 1)
    text_lines_of(quiet_server, rid + "-grpc", 1)
    assert ACCESS not in quiet_server.log()


# --- 1. every line is JSON (last: the log then holds every kind of line the tests above caused) -------


def _not_json(log: str, tolerated: frozenset[str] = frozenset()) -> list[str]:
    return [line for line in log.splitlines() if parse(line) is None and line not in tolerated]


def test_every_line_is_a_json_object(json_server: ServerProcess, http: httpx.Client) -> None:
    rid = unique("last")
    http.get("/v2/health/live", headers={"X-Request-Id": rid})
    log = wait_for(json_server, lambda line: rid in line, f"request {rid}")
    assert not _not_json(log, frozenset({UVICORN_REFUSAL})), "lines that are not JSON:\n" + "\n".join(
        _not_json(log, frozenset({UVICORN_REFUSAL}))
    )
    found = entries(json_server)
    assert {e["logger"] for e in found} >= {"server.app", ACCESS}
    for entry in found:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), entry
        assert all(isinstance(entry[key], str) for key in ("time", "level", "logger", "message")), entry
        datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")  # ISO 8601, UTC, milliseconds
    # Start-up lines are not request lines: no id.
    assert all("request_id" not in e for e in found if e["logger"] == "server.app")


def test_uvicorn_lines_are_json_too(json_server: ServerProcess) -> None:
    status, _ = raw_http(json_server, b"refused\x01")
    assert status == 400
    rid = unique("after-refusal")
    raw_http(json_server, rid.encode())
    log = wait_for(json_server, lambda line: rid in line and ACCESS in line, f"request {rid}")
    assert not _not_json(log), "lines that are not JSON:\n" + "\n".join(_not_json(log))
