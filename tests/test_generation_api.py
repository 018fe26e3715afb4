"""Text generation through real clients: tritonclient streaming, unary ModelInfer, grpcurl, generate.py."""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import ROOT, ServerProcess
from tests.gate import Gate, gate_config
from tests.test_grpcurl_and_health import grpcurl

GREEDY = {"temperature": 0, "ignore_eos": True}


def gen_gate_dir(repo: Path) -> Path:
    return repo.parent / f"{repo.name}-gate"


@pytest.fixture(scope="module")
def gen_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    repo = tmp_path_factory.mktemp("gen_repo")
    shutil.copytree(ROOT / "model_repository" / "bytes_decoder", repo / "bytes_decoder")
    # The same decoder behind a test gate (tests/gate.py): its steps run only when the test lets them.
    gated = repo / "bytes_decoder_gated"
    shutil.copytree(ROOT / "model_repository" / "bytes_decoder", gated)
    config = (gated / "config.pbtxt").read_text().replace('name: "bytes_decoder"', 'name: "bytes_decoder_gated"')
    (gated / "config.pbtxt").write_text(config + "\n" + gate_config(gen_gate_dir(repo)) + "\n")
    Gate(gen_gate_dir(repo))
    server = ServerProcess(repo, tmp_path_factory.mktemp("gen_server"))
    server.gate = Gate(gen_gate_dir(repo))
    yield server
    assert server.stop() == 0, server.log()


def text_inputs(prompt: str, max_tokens: int, stream: bool, sampling: dict) -> list[grpcclient.InferInput]:
    tensors = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([prompt.encode()], dtype=object)),
        ("max_tokens", "INT32", np.array([max_tokens], np.int32)),
        ("stream", "BOOL", np.array([stream])),
        ("sampling_parameters", "BYTES", np.array([json.dumps(sampling).encode()], dtype=object)),
        ("exclude_input_in_output", "BOOL", np.array([True])),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def typed_stream(server: ServerProcess, prompt: str, **fields: object) -> list[dict]:
    body = json.dumps({"model": "bytes_decoder", "prompt": prompt, **fields})
    out = grpcurl(server.address, "ortserve.v1.TextGeneration/Generate", flags=("-d", body))
    messages = [json.loads(part) for part in out.replace("}\n{", "}\x00{").split("\x00") if part.strip()]
    # grpcurl may print camelCase or the proto's own names: use the proto's.
    return [{re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): v for k, v in m.items()} for m in messages]


def test_metadata_and_config_describe_a_decoupled_text_model(gen_server) -> None:
    client = grpcclient.InferenceServerClient(gen_server.address)
    metadata = client.get_model_metadata("bytes_decoder")
    assert [i.name for i in metadata.inputs][:2] == ["text_input", "max_tokens"]
    assert [o.name for o in metadata.outputs] == ["text_output"]
    assert client.get_model_config("bytes_decoder").config.model_transaction_policy.decoupled


def test_grpcurl_streams_readable_json(gen_server) -> None:
    messages = typed_stream(gen_server, "def ", max_tokens=30, temperature=0, ignore_eos=True)
    assert len(messages) > 2
    assert messages[-1]["finish_reason"] == "length" and messages[-1]["completion_tokens"] == 30
    assert all(m.get("text") or m.get("finish_reason") for m in messages)


def test_tritonclient_streaming_gets_deltas_and_an_empty_final_response(gen_server) -> None:
    messages = typed_stream(gen_server, "import ", max_tokens=25, temperature=0, ignore_eos=True)
    expected = "".join(m.get("text", "") for m in messages)
    client = grpcclient.InferenceServerClient(gen_server.address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(
            "bytes_decoder", text_inputs("import ", 25, True, GREEDY), request_id="g1",
            enable_empty_final_response=True,
        )
        responses = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    assert len(responses) > 2
    assert responses[-1].as_numpy("text_output") is None  # the empty final response
    deltas = [r.as_numpy("text_output")[0].decode() for r in responses[:-1]]
    assert "".join(deltas) == expected
    assert all(r.get_response().id == "g1" for r in responses)


def test_unary_model_infer_returns_the_whole_completion(gen_server) -> None:
    messages = typed_stream(gen_server, "class ", max_tokens=20, temperature=0, ignore_eos=True)
    expected = "".join(m.get("text", "") for m in messages)
    client = grpcclient.InferenceServerClient(gen_server.address)
    result = client.infer("bytes_decoder", text_inputs("class ", 20, False, GREEDY))
    assert result.as_numpy("text_output")[0].decode() == expected


def test_generate_client_streams_to_the_terminal(gen_server) -> None:
    result = subprocess.run(
        [sys.executable, "clients/generate.py", "--url", gen_server.address, "--temperature", "0",
         "--max-tokens", "16", "--ignore-eos", "def "],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and "finish: length" in result.stderr


def test_bad_generation_requests_get_clear_statuses(gen_server) -> None:
    import grpc

    from server.rpc.pb import text_generation_pb2 as gen_pb
    from server.rpc.pb import text_generation_pb2_grpc as gen_grpc

    with grpc.insecure_channel(gen_server.address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        for request, code in [
            (gen_pb.GenerateRequest(model="bytes_decoder", prompt="x", top_p=0), grpc.StatusCode.INVALID_ARGUMENT),
            (gen_pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
            (gen_pb.GenerateRequest(model="bytes_decoder", prompt="x" * 400), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=30))
            assert err.value.code() == code, err.value.details()


def test_deadline_and_cancel_mid_stream_through_grpc(gen_server) -> None:
    import grpc

    from server.rpc.pb import text_generation_pb2 as gen_pb
    from server.rpc.pb import text_generation_pb2_grpc as gen_grpc

    long = gen_pb.GenerateRequest(model="bytes_decoder", prompt="def ", max_tokens=200, ignore_eos=True, temperature=0)
    with grpc.insecure_channel(gen_server.address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        received = 0
        gated = gen_pb.GenerateRequest()
        gated.CopyFrom(long)
        gated.model = "bytes_decoder_gated"
        with gen_server.gate.held(), pytest.raises(grpc.RpcError) as err:
            # Its prefill is held at the gate: the deadline passes, whatever the machine's speed.
            for response in stub.Generate(gated, timeout=0.5):
                received += len(response.token_ids)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert received == 0
        call = stub.Generate(long, timeout=60)
        first = [next(call) for _ in range(3)]
        call.cancel()
        assert all(r.text or r.token_ids for r in first)
        # The server goes on serving, and a fresh stream completes.
        fresh = gen_pb.GenerateRequest(model="bytes_decoder", prompt="x", max_tokens=5, ignore_eos=True)
        done = list(stub.Generate(fresh, timeout=60))
        assert done[-1].finish_reason == "length" and done[-1].completion_tokens == 5
