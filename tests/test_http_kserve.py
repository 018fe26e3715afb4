"""KServe v2 REST and Triton's generate extension over HTTP, through tritonclient.http (sync and aio) and httpx."""

from __future__ import annotations

import csv
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from exporters.models import digits
from tests import conftest
from tests.conftest import ROOT, ServerProcess
from tests.gate import WAIT_S, Gate, wait_until
from tests.test_batching import _occupy, _queue_is_full, _rows_run_since, statistics

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


@pytest.fixture(scope="module")
def client(server: ServerProcess):  # type: ignore[no-untyped-def]
    c = httpclient.InferenceServerClient(server.http_address, network_timeout=WAIT_S)
    yield c
    c.close()


def _values(datatype: str) -> np.ndarray:
    dtype = triton_to_np_dtype(datatype)
    if datatype == "BOOL":
        return np.array([[True, False], [False, True], [True, True]])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max], [0, 1], [2, info.max - 1]], dtype=dtype)
    return np.random.default_rng(0).standard_normal((3, 2)).astype(dtype)


def test_health_metadata_and_openapi(server: ServerProcess, client) -> None:  # type: ignore[no-untyped-def]
    assert client.is_server_live() and client.is_server_ready()
    live = httpx.get(f"{server.http_url}/v2/health/live")
    assert live.status_code == 200 and live.content == b""
    assert client.is_model_ready("digits") and not client.is_model_ready("broken")
    not_ready = httpx.get(f"{server.http_url}/v2/models/broken/ready")
    assert not_ready.status_code == 400 and not_ready.content == b""
    metadata = client.get_server_metadata()
    assert metadata["name"] == "ortserve" and "classification" in metadata["extensions"]
    model = client.get_model_metadata("digits")
    assert model["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert client.get_model_metadata("digits", "1")["versions"] == ["1"]
    config = client.get_model_config("digits")
    assert config["name"] == "digits" and config["max_batch_size"] > 0
    document = httpx.get(f"{server.http_url}/openapi.json").json()
    assert {"/v2/models/{name}/infer", "/v2/models/{name}/generate_stream", "/v2/repository/index"} <= set(
        document["paths"]
    )
    assert httpx.get(f"{server.http_url}/docs").status_code == 200


@pytest.mark.parametrize("binary", [False, True])
def test_digits_json_and_binary_match_pytorch(client, repository: conftest.TestRepository, binary: bool) -> None:  # type: ignore[no-untyped-def]
    import torch

    _, x_test, _, _ = digits.load_split(digits.DigitsConfig())
    images = x_test[:4].reshape(4, 1, 8, 8).astype(np.float32)
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    result = client.infer("digits", [tensor], outputs=outputs, request_id="r1")
    with torch.no_grad():
        logits, _ = repository.digits_model(torch.from_numpy(images))
    np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(), rtol=1e-4, atol=1e-4)
    assert result.get_response()["id"] == "r1"
    assert result.as_numpy("probabilities") is None  # only what was asked for


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_every_numeric_type_round_trips(client, datatype: str, binary: bool) -> None:  # type: ignore[no-untyped-def]
    if datatype == "FP16" and not binary:
        pytest.skip("tritonclient sends FP16 only as binary data")
    values = _values(datatype)
    name = datatype.lower()
    tensor = httpclient.InferInput(f"in_{name}", [3, 2], datatype)
    tensor.set_data_from_numpy(values, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(f"out_{name}", binary_data=binary)]
    out = client.infer(f"identity_{name}", [tensor], outputs=outputs).as_numpy(f"out_{name}")
    assert out.dtype == values.dtype
    np.testing.assert_array_equal(out, values)


def test_fp16_and_nested_json_data(server: ServerProcess) -> None:
    """JSON data may be nested or flat; FP16 travels in JSON as numbers."""
    for data in ([[0.5, 1.5], [2.0, -1.0], [0.0, 3.0]], [0.5, 1.5, 2.0, -1.0, 0.0, 3.0]):
        body = {"inputs": [{"name": "in_fp16", "datatype": "FP16", "shape": [3, 2], "data": data}]}
        answer = httpx.post(f"{server.http_url}/v2/models/identity_fp16/infer", json=body)
        assert answer.status_code == 200, answer.text
        output = answer.json()["outputs"][0]
        assert output["shape"] == [3, 2] and output["data"] == [0.5, 1.5, 2.0, -1.0, 0.0, 3.0]


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_tensors(client, binary: bool) -> None:  # type: ignore[no-untyped-def]
    values = np.array([["ab", "é"], ["", "x" * 1000]], dtype=object)
    tensor = httpclient.InferInput("text", [2, 2], "BYTES")
    tensor.set_data_from_numpy(values, binary_data=binary)
    result = client.infer("suffix", [tensor], outputs=[httpclient.InferRequestedOutput("joined", binary_data=binary)])
    expected = np.array([["ab!", "é!"], ["!", "x" * 1000 + "!"]], dtype=object)
    got = result.as_numpy("joined")
    got = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])(got)
    np.testing.assert_array_equal(got, expected)


def test_classification(client) -> None:  # type: ignore[no-untyped-def]
    _, x_test, _, y_test = digits.load_split(digits.DigitsConfig())
    images = x_test[:4].reshape(4, 1, 8, 8).astype(np.float32)
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    outputs = [httpclient.InferRequestedOutput("logits", class_count=3)]
    labels = client.infer("digits", [tensor], outputs=outputs).as_numpy("logits")
    assert labels.shape == (4, 3)
    tops = [int(row[0].decode().split(":")[1]) for row in labels]
    assert sum(t == y for t, y in zip(tops, y_test[:4], strict=True)) >= 3


def test_statistics_count_http_requests(client) -> None:  # type: ignore[no-untyped-def]
    before = client.get_inference_statistics("identity_int32")["model_stats"][0]
    tensor = httpclient.InferInput("in_int32", [1, 2], "INT32")
    tensor.set_data_from_numpy(np.array([[1, 2]], np.int32))
    client.infer("identity_int32", [tensor])
    after = client.get_inference_statistics("identity_int32")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 1
    assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} >= {"digits", "identity_int32"}
    index = client.get_model_repository_index()
    rows = {row["name"]: row for row in index}
    assert rows["digits"]["state"] == "READY" and rows["broken"]["state"] == "UNAVAILABLE"


async def test_aio_client_json_and_binary(server: ServerProcess) -> None:
    client = aiohttpclient.InferenceServerClient(server.http_address)
    try:
        assert await client.is_server_ready()
        values = np.arange(6, dtype=np.int64).reshape(3, 2)
        for binary in (False, True):
            tensor = aiohttpclient.InferInput("in_int64", [3, 2], "INT64")
            tensor.set_data_from_numpy(values, binary_data=binary)
            outputs = [aiohttpclient.InferRequestedOutput("out_int64", binary_data=binary)]
            result = await client.infer("identity_int64", [tensor], outputs=outputs)
            np.testing.assert_array_equal(result.as_numpy("out_int64"), values)
        assert (await client.get_model_metadata("identity_int64"))["name"] == "identity_int64"
        stats = await client.get_inference_statistics("identity_int64")
        assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 2
    finally:
        await client.close()


def test_unknown_model_and_control_mode(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("digits")
    assert err.value.status() == "403" and "explicit" in err.value.message()


def test_model_control_over_http(repository: conftest.TestRepository, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(repository.path / "identity_fp32", repo / "identity_fp32")
    server = ServerProcess(repo, tmp_path, "--model-control-mode", "explicit")
    try:
        client = httpclient.InferenceServerClient(server.http_address, network_timeout=WAIT_S)
        assert not client.is_model_ready("identity_fp32")
        client.load_model("identity_fp32")
        assert client.is_model_ready("identity_fp32")
        config = client.get_model_config("identity_fp32")
        config["max_batch_size"] = 4
        client.load_model("identity_fp32", config=json.dumps(config))
        assert client.get_model_config("identity_fp32")["max_batch_size"] == 4
        with pytest.raises(InferenceServerException) as err:
            client.load_model("identity_fp32", config="{not json")
        assert err.value.status() == "400"
        client.unload_model("identity_fp32")
        assert not client.is_model_ready("identity_fp32")
        with pytest.raises(InferenceServerException) as err:
            client.unload_model("identity_fp32")
        assert err.value.status() == "404"
        client.close()
    finally:
        assert server.stop() == 0, server.log()


def _send_raw(address: tuple[str, int], path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(address, timeout=WAIT_S)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def _gated_body(rows: int) -> bytes:
    data = [0.01] * (rows * 512)
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 512], "data": data}]}).encode()


def test_client_that_disconnects_leaves_the_queue_and_never_runs(
    server: ServerProcess, stub, repository: conftest.TestRepository
) -> None:
    gate: Gate = repository.gates["gated_batched"]
    before = statistics(stub, "gated_batched")
    with gate.held():
        running, run = _occupy(stub, gate)
        # The HTTP request takes the queue's one place (a probe that holds it first gets it refused: send again).
        while True:
            sock = _send_raw(("127.0.0.1", server.http_port), "/v2/models/gated_batched/infer", _gated_body(7))
            while not _queue_is_full(stub):
                if select.select([sock], [], [], 0)[0]:
                    break  # answered already: refused because a probe held the place
            if not select.select([sock], [], [], 0)[0]:
                break
            assert b" 429 " in sock.recv(4096).split(b"\r\n")[0]
            sock.close()
        sock.close()
        wait_until(lambda: not _queue_is_full(stub), "the disconnected request to leave the queue")
        gate.release(run)
        running.result()
    assert _rows_run_since(stub, before) == 256  # the 7 rows never ran


def test_queue_timeout_is_504_and_a_full_queue_429(
    server: ServerProcess, stub, repository: conftest.TestRepository
) -> None:
    """The `timeout` parameter bounds the time in the queue, as on gRPC; a full queue answers at once."""
    gate: Gate = repository.gates["gated_batched"]
    url = f"{server.http_url}/v2/models/gated_batched/infer"
    with gate.held():
        running, run = _occupy(stub, gate)
        body = json.loads(_gated_body(1))
        expired = httpx.post(url, json={**body, "parameters": {"timeout": 1}}, timeout=WAIT_S)
        assert expired.status_code == 504, expired.text
        # One place in the queue: taken by a request that waits, the next one is refused.
        while True:
            sock = _send_raw(("127.0.0.1", server.http_port), "/v2/models/gated_batched/infer", _gated_body(1))
            while not _queue_is_full(stub):
                if select.select([sock], [], [], 0)[0]:
                    break
            if not select.select([sock], [], [], 0)[0]:
                break
            sock.close()
        refused = httpx.post(url, json=body, timeout=WAIT_S)
        assert refused.status_code == 429 and "queued" in refused.json()["error"]
        gate.release(run)
        running.result()
    # The gate is open again: the queued request runs.
    head = b""
    while b"\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_generate_and_generate_stream(tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = tmp_path_factory.mktemp("http_gen_repo")
    shutil.copytree(ROOT / "model_repository" / "bytes_decoder", repo / "bytes_decoder")
    server = ServerProcess(repo, tmp_path_factory.mktemp("http_gen_server"))
    try:
        url = f"{server.http_url}/v2/models/bytes_decoder"
        greedy = {"temperature": 0, "ignore_eos": True}
        body = {"text_input": "def ", "max_tokens": 12, "parameters": greedy}
        whole = httpx.post(f"{url}/generate", json=body, timeout=WAIT_S)
        assert whole.status_code == 200, whole.text
        answer = whole.json()
        assert answer["model_name"] == "bytes_decoder" and answer["text_output"].startswith("def ")
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=WAIT_S) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
        assert len(events) >= 2
        # The deltas add up to the completion that the unary answer gives after the prompt.
        assert "def " + "".join(e.get("text_output", "") for e in events) == answer["text_output"]
        excluded = httpx.post(
            f"{url}/generate", json={**body, "exclude_input_in_output": True}, timeout=WAIT_S
        ).json()["text_output"]
        assert "def " + excluded == answer["text_output"]
        bad = httpx.post(f"{url}/generate", json={"text_input": "x", "parameters": {"top_p": 0}}, timeout=WAIT_S)
        assert bad.status_code == 400 and "top_p" in bad.json()["error"]
        bad = httpx.post(f"{url}/generate_stream", json={"max_tokens": 3}, timeout=WAIT_S)
        assert bad.status_code == 400 and "text_input" in bad.json()["error"]
        tensor = httpx.post(
            f"{server.http_url}/v2/models/bytes_decoder/generate", json={"text_input": 3}, timeout=WAIT_S
        )
        assert tensor.status_code == 400
    finally:
        assert server.stop() == 0, server.log()


def test_workers_both_serve_http(repository: conftest.TestRepository, tmp_path: Path) -> None:
    server = ServerProcess(repository.path, tmp_path, "--workers", "2", "--strict-readiness", "false")
    try:
        seen: set[str] = set()
        # A new connection each time: SO_REUSEPORT spreads connections over both workers.
        for _ in range(400):
            seen.add(httpx.get(f"{server.http_url}/v2", headers={"Connection": "close"}).headers["ortserve-worker"])
            if len(seen) == 2:
                break
        assert seen == {"0", "1"}
        client = httpclient.InferenceServerClient(server.http_address)
        tensor = httpclient.InferInput("in_int8", [1, 2], "INT8")
        tensor.set_data_from_numpy(np.array([[1, -1]], np.int8))
        np.testing.assert_array_equal(client.infer("identity_int8", [tensor]).as_numpy("out_int8"), [[1, -1]])
        client.close()
    finally:
        assert server.stop() == 0, server.log()


def test_sigterm_lets_a_held_http_request_finish_and_refuses_new_ones(
    repository: conftest.TestRepository, tmp_path: Path
) -> None:
    gate: Gate = repository.gates["gated"]
    server = ServerProcess(repository.path, tmp_path, "--strict-readiness", "false", "--shutdown-grace-s", "120")
    url = f"{server.http_url}/v2/models/gated/infer"
    result: dict[str, httpx.Response] = {}
    with gate.held():
        seen = len(gate.entered())
        held = threading.Thread(
            target=lambda: result.setdefault("held", httpx.post(url, timeout=WAIT_S, **_gated_binary()))
        )
        held.start()
        run = gate.wait_entered(seen)
        server.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: httpx.get(f"{server.http_url}/v2/health/ready").status_code == 400, "the server to start draining"
        )
        refused = httpx.post(url, timeout=WAIT_S, **_gated_binary())
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        gate.release(run)
        held.join(WAIT_S)
    assert result["held"].status_code == 200, result["held"].text
    assert result["held"].json()["outputs"][0]["shape"] == [256, 512]
    assert server.stop() == 0, server.log()


def _gated_binary() -> dict[str, Any]:
    """A [256, 512] request to `gated` in Triton's binary tensor extension (httpx.post arguments)."""
    rows = np.full((256, 512), 0.01, np.float32).tobytes()
    tensor = {"name": "x", "datatype": "FP32", "shape": [256, 512], "parameters": {"binary_data_size": len(rows)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    return {"content": header + rows, "headers": {"Inference-Header-Content-Length": str(len(header))}}


def test_perf_analyzer_over_http(server: ServerProcess, tmp_path: Path) -> None:
    """perf_analyzer -i http runs unchanged and reads the server-side statistics."""
    tools = ROOT / "bench" / "tools"
    if not (tools / "perf_analyzer").exists():
        pytest.fail("perf_analyzer is not installed: run scripts/setup.sh (it runs bench/setup_perf_analyzer.sh)")
    cudart = next((tools / "cuda").rglob("libcudart.so.12")).parent
    env = {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    csv_path = tmp_path / "pa.csv"
    run = subprocess.run(
        [
            str(tools / "perf_analyzer"), "-m", "digits", "-i", "http", "-u", server.http_address,
            # A fixed number of requests: no stability windows, which a loaded machine may never reach.
            "--concurrency-range", "2", "--request-count", "200", "-f", str(csv_path),
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0 and csv_path.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    row = next(csv.DictReader(csv_path.read_text().splitlines()))
    assert float(row["Inferences/Second"]) > 0
    assert "Successful request count" in run.stdout  # the server-side statistics, read over HTTP
