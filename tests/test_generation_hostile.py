"""Text generation against hostile and Triton-style clients: bounded sampling settings, request
parameters, [1, 1] scalars, neighbours unharmed, and streams that outlive an unload or reload."""

from __future__ import annotations

import json
import queue
import shutil
import threading
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc
from tests.conftest import ROOT, ServerProcess
from tests.gate import Gate, gate_config, wait_until

MODEL = "bytes_decoder"
GATED = "bytes_decoder_gated"


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    repo = tmp_path_factory.mktemp("hostile_repo")
    shutil.copytree(ROOT / "model_repository" / MODEL, repo / MODEL)
    gated = repo / GATED
    shutil.copytree(ROOT / "model_repository" / MODEL, gated)
    gate_dir = repo.parent / f"{repo.name}-gate"
    config = (gated / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{GATED}"')
    (gated / "config.pbtxt").write_text(config + "\n" + gate_config(gate_dir) + "\n")
    gate = Gate(gate_dir)
    server = ServerProcess(
        repo, tmp_path_factory.mktemp("hostile_server"),
        "--model-control-mode", "explicit", "--load-model", MODEL, "--load-model", GATED,
    )
    server.gate = gate
    yield server
    assert server.stop() == 0, server.log()


def tensor(name: str, datatype: str, value: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(value.shape), datatype)
    t.set_data_from_numpy(value)
    return t


def inputs(
    prompt: str, sampling: str | None = None, shape: tuple[int, ...] = (1,), **scalars: Any
) -> list[grpcclient.InferInput]:
    """text_input, optional raw JSON sampling_parameters, and scalar tensors, all shaped `shape`."""
    out = [tensor("text_input", "BYTES", np.array([prompt.encode()], dtype=object).reshape(shape))]
    if sampling is not None:
        out.append(tensor("sampling_parameters", "BYTES", np.array([sampling.encode()], dtype=object).reshape(shape)))
    for name, value in scalars.items():
        datatype, dtype = ("BOOL", np.bool_) if isinstance(value, bool) else ("INT32", np.int32)
        out.append(tensor(name, datatype, np.array([value], dtype=dtype).reshape(shape)))
    return out


def unary_error(server: ServerProcess, request_inputs: list, **kwargs: Any) -> InferenceServerException:
    client = grpcclient.InferenceServerClient(server.address)
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, request_inputs, **kwargs)
    return err.value


def stream(
    server: ServerProcess, request_inputs: list, model: str = MODEL, headers: dict | None = None, **kwargs: Any
) -> tuple[list, Any]:
    """One streamed request through tritonclient: its responses up to the final one, or its error."""
    client = grpcclient.InferenceServerClient(server.address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
    responses = []
    try:
        client.async_stream_infer(model, request_inputs, **kwargs)
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                return responses, error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses, None
    finally:
        client.stop_stream()


def text_of(responses: list) -> str:
    outputs = (r.as_numpy("text_output") for r in responses)
    return "".join(o.reshape(-1)[0].decode() for o in outputs if o is not None)


HOSTILE_SAMPLING = [
    ('{"temperature": NaN}', "temperature"),
    ('{"temperature": Infinity}', "temperature"),
    ('{"temperature": 101}', "temperature"),
    ('{"repetition_penalty": NaN}', "repetition_penalty"),
    ('{"repetition_penalty": -Infinity}', "repetition_penalty"),
    ('{"top_k": 1e30}', "top_k"),
    ('{"top_k": 2147483648}', "top_k"),
    ('{"max_tokens": 1e400}', "max_tokens"),
    ('{"max_tokens": 100000}', "max_tokens"),
    ('{"max_tokens": 0}', "max_tokens"),
    ('{"top_p": 0}', "top_p"),
    ('{"top_p": NaN}', "top_p"),
    ('{"seed": 18446744073709551616}', "seed"),
    ('{"min_tokens": 6}', "min_tokens"),  # over max_tokens (5)
    ('{"top_k": "40"}', "top_k"),
    ('{"temperature": "hot"}', "temperature"),
    ('{"top_k": true}', "top_k"),
    ('{"ignore_eos": 1}', "ignore_eos"),
    ('{"top_k": 2.5}', "top_k"),
    ('{"bogus": 1}', "bogus"),
    ('{"top_k": 1, "top_k": 2}', "more than once"),
    ('{"top_k": {"a": 1}}', "flat"),
    ('{"top_k": [1]}', "flat"),
    ('[' * 10_000 + ']' * 10_000, "at most 16384"),
    ('[' * 8000 + ']' * 8000, "nested too deeply"),
    ('{"a":' * 2500 + '1' + '}' * 2500, "nested too deeply"),
    ("[1, 2]", "JSON object"),
    ("{", "not valid JSON"),
    ('{"stop": 5}', "stop"),
    (json.dumps({"stop": [f"s{i}" for i in range(17)]}), "at most 16 stop strings"),
    (json.dumps({"stop": ["x" * 129]}), "at most 128 bytes"),
    (json.dumps({"stop": [""]}), "non-empty"),
    (json.dumps({"stop": ["x" * 255] * 1000}), "at most 16384"),
    (json.dumps({"stop": ["x" * 255] * 20}), "at most 16 stop strings"),
]


@pytest.mark.parametrize(
    ("sampling", "named"), HOSTILE_SAMPLING, ids=[h[1] + f"-{i}" for i, h in enumerate(HOSTILE_SAMPLING)]
)
def test_hostile_sampling_parameters_are_invalid_argument(explicit_server, sampling: str, named: str) -> None:
    error = unary_error(explicit_server, inputs("x", sampling, max_tokens=5))
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    assert named in error.message()
    assert len(error.message()) < 400  # client text is quoted only up to a bound
    # The same through streaming, with gRPC statuses turned on.
    responses, error = stream(
        explicit_server, inputs("x", sampling, max_tokens=5), headers={"triton_grpc_error": "true"}
    )
    assert not responses and error is not None and error.status() == "StatusCode.INVALID_ARGUMENT", error


def test_typed_service_refuses_unbounded_settings(explicit_server) -> None:
    with grpc.insecure_channel(explicit_server.address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        for request in (
            gen_pb.GenerateRequest(model=MODEL, prompt="x", temperature=float("nan")),
            gen_pb.GenerateRequest(model=MODEL, prompt="x", repetition_penalty=float("inf")),
            gen_pb.GenerateRequest(model=MODEL, prompt="x", stop=["s"] * 17),
            gen_pb.GenerateRequest(model=MODEL, prompt="x", max_tokens=300),  # over the context of 256
        ):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_a_bad_stream_does_not_fail_the_streams_beside_it(explicit_server) -> None:
    # Others decode on the gated model while a stream with top_k 1e30 arrives: it is refused
    # before admission, and they finish with every token.
    gate = explicit_server.gate
    outcomes: list[tuple[list, Any]] = []
    seen = len(gate.entered())
    with gate.held():
        good = [
            threading.Thread(target=lambda: outcomes.append(stream(
                explicit_server, inputs("ab", '{"temperature": 0, "ignore_eos": true}', max_tokens=30), model=GATED,
            )))
            for _ in range(3)
        ]
        for thread in good:
            thread.start()
        gate.wait_entered(seen)  # the first prefill is at the gate: streams are in the model
        _, error = stream(explicit_server, inputs("ab", '{"top_k": 1e30}', max_tokens=30), model=GATED)
        assert error is not None and "top_k" in str(error)
    for thread in good:
        thread.join(timeout=60)
    assert len(outcomes) == 3
    for responses, error in outcomes:
        assert error is None, error
        assert sum(len(r.as_numpy("text_output")[0]) for r in responses if r.as_numpy("text_output") is not None) > 0
    assert len({text_of(r) for r, _ in outcomes}) == 1  # greedy: the same text, uncut


def test_text_input_shaped_1_1_is_accepted_unary_and_streaming(explicit_server) -> None:
    sampling = '{"temperature": 0, "ignore_eos": true}'
    client = grpcclient.InferenceServerClient(explicit_server.address)
    flat = client.infer(
        MODEL, inputs("def ", sampling, max_tokens=12, exclude_input_in_output=True)
    ).as_numpy("text_output")
    square = client.infer(
        MODEL, inputs("def ", sampling, shape=(1, 1), max_tokens=12, exclude_input_in_output=True)
    ).as_numpy("text_output")
    assert square[0] == flat[0] and len(flat[0]) == 12
    responses, error = stream(explicit_server, inputs("def ", sampling, shape=(1, 1), max_tokens=12, stream=True))
    assert error is None, error
    assert text_of(responses) == flat[0].decode()
    # Other shapes are still refused.
    error = unary_error(explicit_server, inputs("def ", sampling, shape=(1, 1, 1), max_tokens=12))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"


def test_sampling_settings_as_request_parameters_are_honoured(explicit_server) -> None:
    client = grpcclient.InferenceServerClient(explicit_server.address)
    greedy = client.infer(
        MODEL, inputs("def ", '{"temperature": 0, "ignore_eos": true, "max_tokens": 20}', exclude_input_in_output=True)
    ).as_numpy("text_output")[0].decode()
    assert len(greedy) == 20
    as_parameters = client.infer(
        MODEL, inputs("def ", exclude_input_in_output=True),
        parameters={"temperature": 0.0, "ignore_eos": True, "max_tokens": 20},
    ).as_numpy("text_output")[0].decode()
    assert as_parameters == greedy
    # A stop string as a parameter ends the text before it; streaming honours them too.
    stop = greedy[5:8]
    responses, error = stream(
        explicit_server, inputs("def ", stream=True),
        parameters={"temperature": 0.0, "ignore_eos": True, "max_tokens": 20, "stop": stop, "top_k": 3, "seed": 7},
    )
    assert error is None, error
    assert text_of(responses) == greedy[: greedy.find(stop)]
    # The same setting given twice must agree; agreeing twice is fine.
    same = client.infer(MODEL, inputs("def ", '{"max_tokens": 5}', max_tokens=5), parameters={"max_tokens": 5})
    assert same.as_numpy("text_output") is not None
    for kwargs, named in [
        ({"parameters": {"max_tokens": 6}, "request_inputs": inputs("def ", '{"max_tokens": 5}')}, "given twice"),
        ({"parameters": {"max_tokens": 6}, "request_inputs": inputs("def ", max_tokens=5)}, "given twice"),
        ({"parameters": {"temperature": "hot"}, "request_inputs": inputs("def ")}, "temperature"),
        ({"parameters": {"top_k": 1 << 40}, "request_inputs": inputs("def ")}, "top_k"),
        ({"parameters": {"tempreature": 0.5}, "request_inputs": inputs("def ")}, "tempreature"),
        ({"parameters": {"x" * 10_000: 1}, "request_inputs": inputs("def ")}, "unknown request parameter"),
        ({"priority": 1, "request_inputs": inputs("def ")}, "priority"),
    ]:
        request_inputs = kwargs.pop("request_inputs")
        error = unary_error(explicit_server, request_inputs, **kwargs)
        assert error.status() == "StatusCode.INVALID_ARGUMENT", error
        assert named in error.message() and len(error.message()) < 400
        responses, error = stream(explicit_server, request_inputs, headers={"triton_grpc_error": "true"}, **kwargs)
        assert error is not None and error.status() == "StatusCode.INVALID_ARGUMENT", error


def generate_in_thread(server: ServerProcess, max_tokens: int) -> tuple[threading.Thread, list]:
    """A typed greedy stream of `max_tokens` on the gated model, read in a thread; yields responses or the error."""
    received: list = []

    def read() -> None:
        request = gen_pb.GenerateRequest(model=GATED, prompt="x", max_tokens=max_tokens, temperature=0, ignore_eos=True)
        with grpc.insecure_channel(server.address) as channel:
            try:
                received.extend(gen_grpc.TextGenerationStub(channel).Generate(request, timeout=120))
            except grpc.RpcError as exc:
                received.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    return thread, received


def hold_mid_stream(gate: Gate, steps: int, seen: int) -> None:
    """Lets `steps` runs through the (held) gate one by one, then waits for the next one to arrive.

    `seen` is the number of runs at the gate before the stream started (counted before it
    starts: its first run may reach the gate before this function is called).
    """
    for i in range(steps):
        gate.release(gate.wait_entered(seen + i))
    gate.wait_entered(seen + steps)


@pytest.mark.parametrize("action", ["unload", "reload"])
def test_admitted_streams_finish_across_an_unload_or_reload(explicit_server, action: str) -> None:
    client = grpcclient.InferenceServerClient(explicit_server.address)
    gate = explicit_server.gate
    with gate.held():
        seen = len(gate.entered())
        thread, received = generate_in_thread(explicit_server, 240)
        hold_mid_stream(gate, 20, seen)  # prefill and 19 decode steps done; the stream is mid-way
        if action == "unload":
            client.unload_model(GATED)
            wait_until(lambda: not client.is_model_ready(GATED), "the model to stop taking requests")
            # New requests to the retiring version are refused.
            with grpc.insecure_channel(explicit_server.address) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    list(gen_grpc.TextGenerationStub(channel).Generate(
                        gen_pb.GenerateRequest(model=GATED, prompt="x", max_tokens=3), timeout=60))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        else:
            client.load_model(GATED)  # the new copy takes new requests; the old one drains
    thread.join(timeout=120)
    assert received and not isinstance(received[-1], Exception), received[-1:]
    assert received[-1].finish_reason == "length" and received[-1].completion_tokens == 240
    assert sum(len(r.token_ids) for r in received) == 240
    if action == "unload":
        client.load_model(GATED)
    wait_until(lambda: client.is_model_ready(GATED), "the model to be ready again")
    done = list(gen_grpc.TextGenerationStub(grpc.insecure_channel(explicit_server.address)).Generate(
        gen_pb.GenerateRequest(model=GATED, prompt="x", max_tokens=4, ignore_eos=True), timeout=60))
    assert done[-1].completion_tokens == 4
    assert "unloaded during generation" not in explicit_server.log()

