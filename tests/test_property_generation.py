"""Property: whatever sampling settings a client sends a text model, the answer is a proper status.

Hypothesis generates `sampling_parameters` JSON (known and unknown keys; values of every JSON type,
NaN and infinities, huge numbers, nesting), the same settings as request parameters of every kind,
scalar inputs of odd shapes, and typed-service GenerateRequests. Each goes to ModelInfer, ModelStreamInfer
and ortserve.v1.TextGeneration/Generate as fits. No answer may be UNKNOWN or INTERNAL, no stream may carry
"internal error", every accepted stream ends, and afterwards a normal stream still completes.
bench/fuzz.py runs the same strategies longer.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from server.rpc.pb import text_generation_pb2 as gen_pb
from tests.conftest import ROOT, ServerProcess

WAIT_S = 120
BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
INTERNAL_TEXT = "internal error"
MODEL = "bytes_decoder"
KEYS = ["temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed", "stop", "ignore_eos",
        "min_tokens", "stream", "exclude_input_in_output"]

# Small numbers keep accepted streams short (the property is about answers, not generation).
# Bodies that once made the server answer INTERNAL or fail streams batched with them.
KNOWN_HOSTILE = [
    b'{"temperature": NaN}', b'{"repetition_penalty": NaN}', b'{"top_k": 1e30}', b'{"max_tokens": 1e400}',
    b'{"top_k": 1e30, "max_tokens": 4}', b"[" * 10_000 + b"]" * 10_000, b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
    b'{"seed": -1}', b'{"seed": 18446744073709551616}', b'{"top_p": Infinity}', b'{"temperature": -Infinity}',
]
numbers = st.one_of(
    st.integers(-3, 6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**63, 2**64, -(2**63), 10**30, 1e-300, 1e308, 0.5, 1.0]),
)
json_leaves = st.one_of(numbers, st.booleans(), st.none(), st.text(max_size=8))
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _json_text(value: Any) -> str:
    # allow_nan: clients send NaN and Infinity literals too (Python's json does).
    return json.dumps(value, allow_nan=True)


@st.composite
def sampling_json(draw: st.DrawFn) -> bytes:
    """A sampling_parameters body: mostly objects of known keys, sometimes anything at all."""
    kind = draw(st.integers(0, 12))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return _json_text(draw(json_values)).encode()
    if kind == 2:
        depth = draw(st.integers(100, 20_000))
        return b"[" * depth + b"]" * depth
    if kind == 3:
        return draw(st.sampled_from(KNOWN_HOSTILE))
    keys = st.sampled_from(KEYS) | st.text(max_size=6)
    values = st.one_of(numbers, numbers, json_values)
    body = draw(st.dictionaries(keys, values, max_size=5))
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 8 < max_tokens < 2**31:
        body["max_tokens"] = 8
    if "stop" in body and draw(st.booleans()):
        body["stop"] = draw(st.lists(st.text(max_size=300), max_size=40))
    return _json_text(body).encode()


def _parameter(target: Any, key: str, kind: str, value: Any) -> None:
    if kind == "bool_param":
        target[key].bool_param = bool(value)
    elif kind == "int64_param":
        target[key].int64_param = max(-(2**63), min(2**63 - 1, int(value)))
    elif kind == "double_param":
        target[key].double_param = float(value)
    elif kind == "string_param":
        target[key].string_param = str(value)
    elif kind == "uint64_param":
        target[key].uint64_param = max(0, min(2**64 - 1, int(value)))


parameter_kinds = st.sampled_from(["bool_param", "int64_param", "double_param", "string_param", "uint64_param"])
parameter_numbers = st.one_of(st.integers(-3, 8), st.sampled_from([2**31, 2**63 - 1, -(2**63), 10**6]))


@st.composite
def text_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A Triton-convention text request: mostly a well-formed envelope around generated settings
    (so the settings themselves are exercised), sometimes odd shapes and datatypes too."""
    request = pb.ModelInferRequest(model_name=MODEL, id=draw(st.text(max_size=6)))
    odd = draw(st.integers(0, 4)) == 0
    shape = draw(st.sampled_from([[1], [1, 1], [2], [1, 1, 1], []])) if odd else draw(st.sampled_from([[1], [1, 1]]))
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=shape)
    if odd and draw(st.booleans()):
        text.datatype = "INT32"
    for _ in range(max(1, math.prod(shape))):
        text.contents.bytes_contents.append(draw(st.binary(max_size=12)))
    if draw(st.booleans()):
        tokens = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
        if odd:
            tokens.datatype = draw(st.sampled_from(["INT32", "INT64", "FP32"]))
            tokens.shape[:] = draw(st.sampled_from([[1], [1, 1], [2]]))
        tokens.contents.int_contents.extend(draw(st.lists(st.integers(-2, 8), min_size=1, max_size=2 if odd else 1)))
    if draw(st.integers(0, 4)) > 0:
        params = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
        params.contents.bytes_contents.append(draw(sampling_json()))
    parameter_keys = st.sampled_from(KEYS + ["priority", "timeout", "sequence_id", "x"])
    for key in draw(st.lists(parameter_keys, max_size=3, unique=True)):
        value = draw(parameter_numbers)
        _parameter(request.parameters, key, draw(parameter_kinds), min(value, 8) if key == "max_tokens" else value)
    return request


@st.composite
def generate_requests(draw: st.DrawFn) -> gen_pb.GenerateRequest:
    """A typed-service request with generated fields."""
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    return gen_pb.GenerateRequest(
        model=draw(st.sampled_from([MODEL, MODEL, "digits", "", "nope"])),
        prompt=draw(st.text(max_size=12)),
        max_tokens=draw(st.integers(-2, 8) | st.sampled_from([2**31 - 1])),
        temperature=draw(floats), top_k=draw(st.integers(-(2**31), 2**31 - 1)), top_p=draw(floats),
        repetition_penalty=draw(floats), seed=draw(st.integers(0, 2**64 - 1)),
        stop=draw(st.lists(st.text(max_size=200), max_size=20)), ignore_eos=draw(st.booleans()),
    )


def make_generation_checks(
    channel: grpc.Channel, seen: Counter[str], max_examples: int, seed: int | None = None
) -> list[Callable[[], None]]:
    """The property checks as plain callables (used here and by bench/fuzz.py)."""
    settings_ = settings(
        max_examples=max_examples, deadline=None, derandomize=seed is None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    generate = channel.unary_stream("/ortserve.v1.TextGeneration/Generate")

    def common(test: Callable[..., None]) -> Callable[..., None]:
        test = settings_(test)
        return test if seed is None else hypothesis.seed(seed)(test)

    def status(call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
        try:
            return grpc.StatusCode.OK, call()
        except grpc.RpcError as exc:
            return exc.code(), exc.details()

    @common
    @given(text_requests())
    def triton_property(request: pb.ModelInferRequest) -> None:
        body = request.SerializeToString()
        code, detail = status(lambda: infer(body, timeout=WAIT_S))
        seen[code.name] += 1
        assert code not in BAD_CODES, (code, detail, request)
        code, responses = status(lambda: list(stream(iter([body]), timeout=WAIT_S)))
        assert code not in BAD_CODES, (code, responses, request)
        if code == grpc.StatusCode.OK:
            for message in responses:
                error = pb.ModelStreamInferResponse.FromString(message).error_message
                assert INTERNAL_TEXT not in error, (error, request)

    @common
    @given(generate_requests())
    def typed_property(request: gen_pb.GenerateRequest) -> None:
        code, detail = status(lambda: list(generate(request.SerializeToString(), timeout=WAIT_S)))
        seen[code.name] += 1
        assert code not in BAD_CODES, (code, detail, request)
        if code == grpc.StatusCode.OK:
            last = gen_pb.GenerateResponse.FromString(detail[-1])
            assert last.finish_reason in ("stop", "length"), last

    return [triton_property, typed_property]


def check_generation_alive(channel: grpc.Channel) -> None:
    """A normal stream still completes with exactly its tokens."""
    generate = channel.unary_stream(
        "/ortserve.v1.TextGeneration/Generate",
        request_serializer=gen_pb.GenerateRequest.SerializeToString,
        response_deserializer=gen_pb.GenerateResponse.FromString,
    )
    request = gen_pb.GenerateRequest(model=MODEL, prompt="def ", max_tokens=6, ignore_eos=True, temperature=0)
    last = list(generate(request, timeout=WAIT_S))[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 6


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("property_gen_repo")
    shutil.copytree(ROOT / "model_repository" / MODEL, repo / MODEL)
    server = ServerProcess(repo, tmp_path_factory.mktemp("property_gen_server"))
    yield server
    assert server.stop() == 0, server.log()


def test_every_sampling_setting_gets_a_proper_status_and_generation_goes_on(text_server: ServerProcess) -> None:
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(text_server.address) as channel:
        triton_property, typed_property = make_generation_checks(channel, seen, max_examples=300)
        triton_property()
        check_generation_alive(channel)
        typed_property()
        check_generation_alive(channel)
    # The generated requests reach past the first checks: some are refused, some generate.
    assert seen["INVALID_ARGUMENT"] and seen["OK"], seen
