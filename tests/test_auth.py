"""Authentication, authorisation, rate limits and the audit log (--auth-config), through real clients.

One server with API keys and a JWKS (RSA and EC keys made here with `cryptography`), the example
digits models (the pipeline is an ensemble that calls `digits`) and text model, in explicit
control mode so that load and unload can be refused or allowed. Every gRPC check is made with
tritonclient (or grpcurl, or the typed Generate stub), every HTTP one with tritonclient.http,
httpx or the openai package.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc
from tests.conftest import ROOT, ServerProcess
from tests.gate import Gate, gate_config, wait_until
from tests.test_grpcurl_and_health import GRPCURL

WAIT_S = 120.0
ISSUER = "https://issuer.test/"
AUDIENCE = "ortserve"
TEXT = "bytes_decoder"
GATED = "bytes_decoder_gated"
MODELS = ("digits", "digits_preprocess", "digits_pipeline", TEXT)

KEYS = {
    "everything": "key-everything-0123456789",  # infer + admin + metrics on every model
    "pipeline-only": "key-pipeline-only-0123456789",  # infer on the pipeline and its first step, not on digits
    "infer-digits": "key-infer-digits-0123456789",  # infer on digits*, no admin
    "metrics": "key-metrics-0123456789",
    "limited": "key-limited-0123456789",  # a burst of 3, then (practically) nothing
    "one-stream": "key-one-stream-0123456789",  # one generation at a time
    "generous": "key-generous-0123456789",  # a burst of 1000
    "revoked": "key-revoked-0123456789",  # removed from the file in test_sighup_*
}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@dataclass
class Signers:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    jwks: Path
    rsa_public_pem: bytes

    def token(self, alg: str = "RS256", kid: str | None = "rsa-1", **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600,
                   "scope": "ortserve.infer", **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        key = self.rsa_key if alg.startswith("RS") else self.ec_key
        headers = {"kid": kid} if kid is not None else {}
        return jwt.encode(payload, key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}.{_b64(signature)}"


def write_config(path: Path, signers: Signers, drop: tuple[str, ...] = ()) -> None:
    entries = {
        "everything": {"roles": ["infer", "admin", "metrics"]},
        "pipeline-only": {"roles": ["infer"], "models": ["digits_pipeline", "digits_preprocess"]},
        "infer-digits": {"roles": ["infer"], "models": ["digits*"]},
        "metrics": {"roles": ["metrics"]},
        "limited": {"roles": ["infer"], "rate_limit": {"requests_per_second": 0.001, "burst": 3}},
        "one-stream": {"roles": ["infer"], "rate_limit": {"max_streams": 1}},
        "generous": {"roles": ["infer"], "rate_limit": {"requests_per_second": 1000, "burst": 1000}},
        "revoked": {"roles": ["infer"]},
    }
    config = {
        "api_keys": [
            {"name": name, "key_sha256": sha(KEYS[name]), **entry}
            for name, entry in entries.items() if name not in drop
        ],
        "jwt": {
            "jwks_file": str(signers.jwks), "issuer": ISSUER, "audience": AUDIENCE, "leeway_s": 5,
            "role_map": {"ortserve.infer": "infer", "ortserve.admin": "admin"}, "models_claim": "models",
        },
    }
    path.write_text(json.dumps(config))  # JSON is YAML


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Signers:
    directory = tmp_path_factory.mktemp("jwks")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, key, alg in (("rsa-1", rsa_key, "RS256"), ("ec-1", ec_key, "ES256")):
        algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
        jwk = json.loads(algorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Signers(rsa_key, ec_key, jwks, pem)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Gate]:
    root = tmp_path_factory.mktemp("auth_repo")
    for name in MODELS:
        shutil.copytree(ROOT / "model_repository" / name, root / name)
    gated = root / GATED
    shutil.copytree(ROOT / "model_repository" / TEXT, gated)
    gate_dir = root.parent / f"{root.name}-gate"
    gate = Gate(gate_dir)
    config = (gated / "config.pbtxt").read_text().replace(f'name: "{TEXT}"', f'name: "{GATED}"')
    (gated / "config.pbtxt").write_text(config + "\n" + gate_config(gate_dir) + "\n")
    return root, gate


@pytest.fixture(scope="module")
def auth_file(signers: Signers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "auth.yaml"
    write_config(path, signers)
    return path


@pytest.fixture(scope="module")
def server(
    repo: tuple[Path, Gate], auth_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    process = ServerProcess(
        repo[0], tmp_path_factory.mktemp("auth_server"), "--auth-config", str(auth_file),
        "--model-control-mode", "explicit", "--load-model", "*",
    )
    yield process
    assert process.stop() == 0, process.log()


def image() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    return tensor


def pixels() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("pixels", [1, 8, 8], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 8, 8), np.uint8))
    return tensor


def grpc_infer(server: ServerProcess, model: str, key: str | None) -> Any:
    inputs = [pixels()] if model in ("digits_preprocess", "digits_pipeline") else [image()]
    with grpcclient.InferenceServerClient(server.address) as client:
        return client.infer(model, inputs, headers=bearer(key) if key is not None else None)


def grpc_status(call: Any) -> tuple[str, str]:
    """The status name and message of a call that is expected to fail."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), str(caught.value.message())


def http_infer(server: ServerProcess, model: str, key: str | None) -> httpx.Response:
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}
    headers = bearer(key) if key is not None else {}
    return httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=body, headers=headers, timeout=WAIT_S)


# --- API keys on both front ends --------------------------------------------------------------------------------


def test_api_key_lets_tritonclient_grpc_and_http_infer(server: ServerProcess) -> None:
    result = grpc_infer(server, "digits", KEYS["everything"])
    assert result.as_numpy("logits").shape == (1, 10)
    with httpclient.InferenceServerClient(server.http_address) as client:
        tensor = httpclient.InferInput("image", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        answer = client.infer("digits", [tensor], headers=bearer(KEYS["everything"]))
        assert answer.as_numpy("logits").shape == (1, 10)


@pytest.mark.parametrize("key", [None, "wrong-key", KEYS["everything"] + "x"])
def test_missing_or_wrong_keys_are_unauthenticated_and_never_echoed(server: ServerProcess, key: str | None) -> None:
    code, message = grpc_status(lambda: grpc_infer(server, "digits", key))
    assert code == "StatusCode.UNAUTHENTICATED"
    response = http_infer(server, "digits", key)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    for text in (message, response.text):
        assert "key-everything" not in text and "wrong-key" not in text


def test_a_scheme_other_than_bearer_is_unauthenticated(server: ServerProcess) -> None:
    basic = {"authorization": f"Basic {KEYS['everything']}"}
    response = httpx.get(f"{server.http_url}/v2/models/digits", headers=basic)
    assert response.status_code == 401


def test_grpc_trailers_of_a_refusal_carry_www_authenticate(server: ServerProcess) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="digits"), timeout=WAIT_S)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(caught.value.trailing_metadata())["www-authenticate"].startswith("Bearer")


def test_openai_client_with_api_key(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=KEYS["everything"], timeout=WAIT_S)
    completion = client.completions.create(model=TEXT, prompt="def ", max_tokens=4, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens >= 1
    refused = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="not-a-key", timeout=WAIT_S, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        refused.completions.create(model=TEXT, prompt="def ", max_tokens=4)


def test_grpcurl_with_and_without_a_key(server: ServerProcess) -> None:
    def grpcurl(*flags: str) -> subprocess.CompletedProcess[str]:
        method = "inference.GRPCInferenceService/ServerMetadata"
        return subprocess.run([GRPCURL, "-plaintext", *flags, server.address, method],
                              capture_output=True, text=True, timeout=WAIT_S)

    allowed = grpcurl("-H", f"authorization: Bearer {KEYS['everything']}")
    assert allowed.returncode == 0 and '"name": "ortserve"' in allowed.stdout
    refused = grpcurl()
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


def test_typed_generate_stream_needs_a_key(server: ServerProcess) -> None:
    request = gen_pb.GenerateRequest(model=TEXT, prompt="def ", max_tokens=4, ignore_eos=True)
    with grpc.insecure_channel(server.address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        chunks = list(stub.Generate(request, metadata=tuple(bearer(KEYS["everything"]).items()), timeout=WAIT_S))
        assert chunks[-1].completion_tokens == 4
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=WAIT_S))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_stream_infer_checks_each_request_model(server: ServerProcess) -> None:
    results: list[Any] = []
    with grpcclient.InferenceServerClient(server.address) as client:
        client.start_stream(callback=lambda result, error: results.append((result, error)),
                            headers=bearer(KEYS["infer-digits"]))
        client.async_stream_infer("digits", [image()], request_id="allowed")
        client.async_stream_infer(TEXT, [image()], request_id="denied")  # outside digits*
        client.async_stream_infer("digits", [image()], request_id="allowed-again")  # the stream goes on
        client.stop_stream()
    assert len(results) == 3
    answered = [r.get_response().id for r, e in results if e is None]
    refused = [str(e) for r, e in results if e is not None]
    assert sorted(answered) == ["allowed", "allowed-again"]
    assert len(refused) == 1 and "may not use model" in refused[0]


def test_stream_infer_without_a_key_is_refused(server: ServerProcess) -> None:
    errors: list[Any] = []
    with grpcclient.InferenceServerClient(server.address) as client:
        client.start_stream(callback=lambda result, error: errors.append(error))
        try:
            client.async_stream_infer("digits", [image()])
        except InferenceServerException as exc:  # the refusal may end the stream before the request is queued
            assert "no longer in valid state" in str(exc)
        client.stop_stream()
    assert len(errors) == 1 and errors[0] is not None
    assert errors[0].status() == "StatusCode.UNAUTHENTICATED"


# --- open routes -----------------------------------------------------------------------------------------------


def test_health_is_open_for_kubernetes_probes(server: ServerProcess) -> None:
    assert httpx.get(f"{server.http_url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server.http_url}/v2/health/live").status_code == 200
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpcclient.InferenceServerClient(server.address) as client:
        assert client.is_server_ready() and client.is_server_live()


def test_reflection_follows_the_infer_role(server: ServerProcess) -> None:
    listed = subprocess.run([GRPCURL, "-plaintext", "-H", f"authorization: Bearer {KEYS['everything']}",
                             server.address, "list"], capture_output=True, text=True, timeout=WAIT_S)
    assert listed.returncode == 0 and "inference.GRPCInferenceService" in listed.stdout
    refused = subprocess.run([GRPCURL, "-plaintext", server.address, "list"], capture_output=True, text=True,
                             timeout=WAIT_S)
    assert refused.returncode != 0 and "inference.GRPCInferenceService" not in refused.stdout


def test_health_can_be_closed_and_reflection_opened(
    repo: tuple[Path, Gate], signers: Signers, tmp_path: Path
) -> None:
    path = tmp_path / "auth.yaml"
    write_config(path, signers)
    config = json.loads(path.read_text())
    config["open"] = {"health": False, "reflection": True}
    path.write_text(json.dumps(config))
    server = ServerProcess(repo[0], tmp_path, "--auth-config", str(path))
    try:
        assert httpx.get(f"{server.http_url}/v2/health/ready").status_code == 401
        ready = httpx.get(f"{server.http_url}/v2/health/ready", headers=bearer(KEYS["infer-digits"]))
        assert ready.status_code == 200
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = health.Check(health_pb2.HealthCheckRequest(), metadata=tuple(bearer(KEYS["infer-digits"]).items()),
                                 timeout=WAIT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with grpcclient.InferenceServerClient(server.address) as client:
            code, _ = grpc_status(lambda: client.is_server_live())
            assert code == "StatusCode.UNAUTHENTICATED"
        listed = subprocess.run([GRPCURL, "-plaintext", server.address, "list"], capture_output=True, text=True,
                                timeout=WAIT_S)
        assert listed.returncode == 0 and "inference.GRPCInferenceService" in listed.stdout
    finally:
        assert server.stop() == 0, server.log()


# --- roles and models ------------------------------------------------------------------------------------------


def test_a_key_allowed_on_one_model_is_denied_another_and_an_ensemble_calling_it(server: ServerProcess) -> None:
    key = KEYS["pipeline-only"]
    assert grpc_infer(server, "digits_preprocess", key).as_numpy("image").shape == (1, 1, 8, 8)
    for model in ("digits", "digits_pipeline", "no_such_model"):
        code, message = grpc_status(lambda m=model: grpc_infer(server, m, key))
        assert code == "StatusCode.PERMISSION_DENIED", (model, message)
        assert http_infer(server, model, key).status_code == 403
    # Metadata, config and statistics of a model it may not use are refused alike.
    headers = bearer(key)
    for path in ("/v2/models/digits", "/v2/models/digits/config", "/v2/models/digits/stats", "/v2/models/digits/ready"):
        assert httpx.get(f"{server.http_url}{path}", headers=headers).status_code == 403, path
    stats = httpx.get(f"{server.http_url}/v2/models/stats", headers=headers).json()
    assert {m["name"] for m in stats["model_stats"]} <= {"digits_pipeline", "digits_preprocess"}


def test_listings_leave_out_models_the_principal_may_not_use(server: ServerProcess) -> None:
    everything = httpx.post(f"{server.http_url}/v2/repository/index", headers=bearer(KEYS["everything"])).json()
    assert {e["name"] for e in everything} >= set(MODELS)
    models = httpx.get(f"{server.http_url}/v1/models", headers=bearer(KEYS["infer-digits"])).json()
    assert models["data"] == []  # the text models are not digits*
    models = httpx.get(f"{server.http_url}/v1/models", headers=bearer(KEYS["everything"])).json()
    assert TEXT in {m["id"] for m in models["data"]}


def test_jwt_principal_sees_only_the_models_of_its_claim(server: ServerProcess, signers: Signers) -> None:
    token = signers.token(scope="ortserve.infer ortserve.admin", models=["digits"])
    with grpcclient.InferenceServerClient(server.address) as client:
        index = client.get_model_repository_index(headers=bearer(token), as_json=True)
    assert {m["name"] for m in index["models"]} == {"digits"}


def test_infer_key_may_not_load_or_unload(server: ServerProcess) -> None:
    key = KEYS["infer-digits"]
    with grpcclient.InferenceServerClient(server.address) as client:
        code, _ = grpc_status(lambda: client.unload_model("digits", headers=bearer(key)))
        assert code == "StatusCode.PERMISSION_DENIED"
        code, _ = grpc_status(lambda: client.get_model_repository_index(headers=bearer(key)))
        assert code == "StatusCode.PERMISSION_DENIED"
    response = httpx.post(f"{server.http_url}/v2/repository/models/digits/load", headers=bearer(key))
    assert response.status_code == 403
    assert grpc_infer(server, "digits", key).as_numpy("logits").shape == (1, 10)  # still loaded


def test_admin_load_and_unload_are_audited(server: ServerProcess) -> None:
    key = KEYS["everything"]
    with grpcclient.InferenceServerClient(server.address) as client:
        client.unload_model("digits_preprocess", headers=bearer(key))
        wait_until(lambda: not client.is_model_ready("digits_preprocess", headers=bearer(key)), "the unload")
        client.load_model("digits_preprocess", headers=bearer(key))
        assert client.is_model_ready("digits_preprocess", headers=bearer(key))
    log = server.log()
    assert "audit model_unload principal=everything model=digits_preprocess outcome=ok" in log
    assert "audit model_load principal=everything model=digits_preprocess outcome=ok" in log
    assert "key-everything" not in log


def test_refused_authentication_is_audited_without_the_secret(server: ServerProcess) -> None:
    http_infer(server, "digits", "audit-probe-secret-value")
    wait_until(lambda: "audit authentication_refused" in server.log(), "the audit line")
    lines = [line for line in server.log().splitlines() if "authentication_refused" in line]
    assert any("reason=invalid API key" in line for line in lines)
    assert not any("audit-probe-secret-value" in line for line in lines)


def test_audit_lines_cannot_be_forged_through_the_path(server: ServerProcess) -> None:
    """A percent-encoded newline in the path reaches the audit line escaped, not as a second line."""
    forged = "audit model_unload principal=everything model=forged outcome=ok"
    path = "/v2/models/x%0A" + forged.replace(" ", "%20").replace("=", "%3D") + "/ready"
    assert httpx.get(f"{server.http_url}{path}", headers=bearer("not-a-key")).status_code == 401
    wait_until(lambda: "model=forged" in server.log(), "the refused request's audit line")
    assert not any(line.startswith(forged) for line in server.log().splitlines())
    assert any("\\x0a" + forged in line for line in server.log().splitlines())


def test_metrics_need_the_metrics_role(server: ServerProcess) -> None:
    for url in (server.metrics_url, f"{server.http_url}/metrics"):
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers=bearer(KEYS["infer-digits"])).status_code == 403
        scraped = httpx.get(url, headers=bearer(KEYS["metrics"]))
        assert scraped.status_code == 200 and "nv_inference_count" in scraped.text


def test_our_command_line_clients_send_the_key(server: ServerProcess) -> None:
    """clients/predict.py and clients/generate.py take --api-key (or ORTSERVE_API_KEY); without it, a clear refusal."""
    predict = [sys.executable, str(ROOT / "clients" / "predict.py"), "--url", server.address]
    allowed = subprocess.run([*predict, "--api-key", KEYS["everything"]], capture_output=True, text=True,
                             timeout=WAIT_S)
    assert allowed.returncode == 0 and "logits" in allowed.stdout, allowed.stderr
    from_env = subprocess.run(predict, capture_output=True, text=True, timeout=WAIT_S,
                              env={**os.environ, "ORTSERVE_API_KEY": KEYS["infer-digits"]})
    assert from_env.returncode == 0, from_env.stderr
    refused = subprocess.run(predict, capture_output=True, text=True, timeout=WAIT_S,
                             env={k: v for k, v in os.environ.items() if k != "ORTSERVE_API_KEY"})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    generate = [sys.executable, str(ROOT / "clients" / "generate.py"), "--url", server.address, "--max-tokens", "4",
                "--ignore-eos", "--api-key", KEYS["everything"], "def "]
    streamed = subprocess.run(generate, capture_output=True, text=True, timeout=WAIT_S)
    assert streamed.returncode == 0 and "completion 4 tokens" in streamed.stderr, streamed.stderr


def test_the_node_client_sends_the_key(server: ServerProcess) -> None:
    """clients/node's CLIs take --api-key (or ORTSERVE_API_KEY): the interceptor adds it to unary calls and streams."""
    node_dir = ROOT / "clients" / "node"
    env = {k: v for k, v in os.environ.items() if k != "ORTSERVE_API_KEY"}

    def node(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = {"ORTSERVE_API_KEY": key} if key else {}
        return subprocess.run(["node", *args], cwd=node_dir, capture_output=True, text=True, timeout=WAIT_S,
                              env={**env, **extra})

    infer = node("infer.js", "--url", server.address, "--image", "../samples/digit_3.png", "--api-key",
                 KEYS["everything"])
    assert infer.returncode == 0 and "predicted: 3" in infer.stdout, infer.stderr
    streamed = node("generate.js", "--url", server.address, "--max-tokens", "4", "--ignore-eos", "def ",
                    key=KEYS["everything"])
    assert streamed.returncode == 0 and "completion 4 tokens" in streamed.stderr, streamed.stderr
    refused = node("infer.js", "--url", server.address, "--image", "../samples/digit_3.png")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


# --- JWT ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg,kid", [("RS256", "rsa-1"), ("ES256", "ec-1")])
def test_valid_jwts_are_accepted(server: ServerProcess, signers: Signers, alg: str, kid: str) -> None:
    token = signers.token(alg=alg, kid=kid, models=["digits*"])
    assert grpc_infer(server, "digits", token).as_numpy("logits").shape == (1, 10)
    assert http_infer(server, "digits", token).status_code == 200
    assert http_infer(server, TEXT, token).status_code == 403  # outside its models claim


def _bad_tokens(signers: Signers) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 3600, "scope": "ortserve.infer",
              "models": ["*"]}
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    signing_input = unsigned_token(header, claims).rsplit(".", 1)[0]
    confused = hmac.new(signers.rsa_public_pem, signing_input.encode(), hashlib.sha256).digest()
    return {
        "expired": signers.token(exp=now - 3600, iat=now - 7200, models=["*"]),
        "not yet valid": signers.token(nbf=now + 3600, models=["*"]),
        "wrong audience": signers.token(aud="someone-else", models=["*"]),
        "wrong issuer": signers.token(iss="https://evil.test/", models=["*"]),
        "alg none": unsigned_token({"alg": "none", "typ": "JWT"}, claims),
        "HS256 with the public key": f"{signing_input}.{_b64(confused)}",
        "unknown kid": signers.token(kid="rsa-2", models=["*"]),
        "bad signature": signers.token(models=["*"])[:-4] + "AAAA",
    }


@pytest.mark.parametrize("case", ["expired", "not yet valid", "wrong audience", "wrong issuer", "alg none",
                                  "HS256 with the public key", "unknown kid", "bad signature"])
def test_bad_jwts_are_unauthenticated(server: ServerProcess, signers: Signers, case: str) -> None:
    token = _bad_tokens(signers)[case]
    code, message = grpc_status(lambda: grpc_infer(server, "digits", token))
    assert code == "StatusCode.UNAUTHENTICATED", message
    response = http_infer(server, "digits", token)
    assert response.status_code == 401 and token not in response.text


def test_jwt_without_the_role_is_denied(server: ServerProcess, signers: Signers) -> None:
    token = signers.token(scope="profile email", models=["*"])
    code, _ = grpc_status(lambda: grpc_infer(server, "digits", token))
    assert code == "StatusCode.PERMISSION_DENIED"


# --- rate limits ---------------------------------------------------------------------------------------------------


def test_a_burst_over_the_limit_is_refused_at_once_with_a_retry_hint(server: ServerProcess) -> None:
    key = KEYS["limited"]  # a burst of 3 that refills one request per 1000 s
    assert [http_infer(server, "digits", key).status_code for _ in range(3)] == [200, 200, 200]
    refused = http_infer(server, "digits", key)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ServerMetadata(
                service_pb2.ServerMetadataRequest(), metadata=tuple(bearer(key).items()), timeout=WAIT_S
            )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(caught.value.trailing_metadata())
    assert int(trailers["retry-after"]) >= 1 and int(trailers["grpc-retry-pushback-ms"]) > 0


def test_requests_under_the_limit_are_never_refused(server: ServerProcess) -> None:
    key = KEYS["generous"]  # a burst of 1000: 200 requests as fast as two clients can send them
    codes: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=WAIT_S) as client:
            for _ in range(100):
                codes.append(client.get(f"{server.http_url}/v2/models/digits", headers=bearer(key)).status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert codes == [200] * 200


def test_concurrent_generation_streams_are_limited(server: ServerProcess, repo: tuple[Path, Gate]) -> None:
    gate = repo[1]
    key = KEYS["one-stream"]
    metadata = tuple(bearer(key).items())
    request = gen_pb.GenerateRequest(model=GATED, prompt="def ", max_tokens=4, ignore_eos=True)
    finished: list[Any] = []
    with grpc.insecure_channel(server.address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        with gate.held():
            seen = len(gate.entered())
            first = threading.Thread(
                target=lambda: finished.extend(stub.Generate(request, metadata=metadata, timeout=WAIT_S))
            )
            first.start()
            gate.wait_entered(seen)  # the first stream runs (held at the gate)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request, metadata=metadata, timeout=WAIT_S))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            body = {"model": GATED, "prompt": "def ", "max_tokens": 4, "stream": True}
            refused = httpx.post(f"{server.http_url}/v1/completions", json=body, headers=bearer(key), timeout=WAIT_S)
            assert refused.status_code == 429 and "retry-after" in refused.headers
        first.join(WAIT_S)
        assert finished and finished[-1].completion_tokens == 4
        # The slot is free again once the first stream ended.
        assert list(stub.Generate(request, metadata=metadata, timeout=WAIT_S))[-1].completion_tokens == 4


# --- SIGHUP reload ---------------------------------------------------------------------------------------------------


def test_sighup_reloads_the_config_and_revokes_a_removed_key(
    server: ServerProcess, auth_file: Path, signers: Signers
) -> None:
    key = KEYS["revoked"]
    assert http_infer(server, "digits", key).status_code == 200
    original = auth_file.read_text()
    try:
        auth_file.write_text("api_keys: [ {name: broken} ]")  # invalid: the current config stays
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "auth config not reloaded" in server.log(), "the failed reload's error")
        assert http_infer(server, "digits", key).status_code == 200
        write_config(auth_file, signers, drop=("revoked",))
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: http_infer(server, "digits", key).status_code == 401, "the key to be revoked")
        assert http_infer(server, "digits", KEYS["everything"]).status_code == 200
    finally:
        auth_file.write_text(original)
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: http_infer(server, "digits", key).status_code == 200, "the key to be back")


# --- workers, start-up and the command line ---------------------------------------------------------------------------


def test_workers_trust_each_other_on_the_private_socket_only(
    repo: tuple[Path, Gate], auth_file: Path, tmp_path: Path
) -> None:
    """With two workers, an admin's unload and load reach both (the fan-out needs no credentials on the
    private socket), and the peer header on the public port is no way around auth."""
    server = ServerProcess(repo[0], tmp_path, "--auth-config", str(auth_file), "--workers", "2",
                           "--model-control-mode", "explicit", "--load-model", "digits")
    try:
        admin = bearer(KEYS["everything"])
        assert httpx.post(f"{server.http_url}/v2/repository/models/digits/unload", headers=admin).status_code == 200
        for _ in range(8):  # new connections land on either worker
            assert httpx.get(f"{server.http_url}/v2/models/digits/ready", headers=admin).status_code == 400
        assert httpx.post(f"{server.http_url}/v2/repository/models/digits/load", headers=admin).status_code == 200
        for _ in range(8):
            assert http_infer(server, "digits", KEYS["everything"]).status_code == 200
        with grpcclient.InferenceServerClient(server.address) as client:
            code, _ = grpc_status(lambda: client.unload_model("digits", headers={"ortserve-peer-local": "1"}))
            assert code == "StatusCode.UNAUTHENTICATED"
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("config,named", [
    ({"api_keys": [{"name": "a", "key_sha256": "00" * 32, "roles": ["infer", "root"]}]}, "api_keys[0].roles[1]"),
    ({"api_keys": [{"name": "a", "key_sha256": "not-hex", "roles": ["infer"]}]}, "api_keys[0].key_sha256"),
    ({"api_keys": [{"name": "a", "key_sha256": "00" * 32, "roles": ["infer"], "modles": ["*"]}]},
     "api_keys[0].modles"),
    ({"jwt": {"jwks_file": "/nonexistent/jwks.json", "issuer": "i", "audience": "a"}}, "jwks_file"),
    ({"open": {"health": True}}, "give api_keys, jwt, or both"),
])
def test_a_bad_auth_config_stops_the_start_naming_the_entry(
    repo: tuple[Path, Gate], tmp_path: Path, config: dict[str, Any], named: str
) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", str(repo[0]), "--auth-config", str(path), "--port", "0",
         "--http-port", "0", "--metrics-port", "0", "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=WAIT_S, cwd=ROOT,
    )
    assert result.returncode != 0
    assert named in result.stderr, result.stderr


def test_open_servers_log_a_warning(repo: tuple[Path, Gate], tmp_path: Path) -> None:
    server = ServerProcess(repo[0], tmp_path, "--host", "0.0.0.0", "--model-control-mode", "explicit")
    try:
        log = server.log()
        assert "without TLS or --auth-config: anyone who reaches the ports can run every model" in log
        assert "explicit without --auth-config: anyone who reaches the ports can load and unload models" in log
    finally:
        assert server.stop() == 0, server.log()


def test_hash_key_prints_the_digest_the_config_stores() -> None:
    result = subprocess.run([sys.executable, "-m", "server", "hash-key"], input="my secret key\n",
                            capture_output=True, text=True, timeout=WAIT_S, cwd=ROOT)
    assert result.stdout.strip() == hashlib.sha256(b"my secret key").hexdigest()
    generated = subprocess.run([sys.executable, "-m", "server", "hash-key", "--generate"], capture_output=True,
                               text=True, timeout=WAIT_S, cwd=ROOT)
    lines = dict(line.split(": ", 1) for line in generated.stdout.strip().splitlines())
    assert hashlib.sha256(lines["key"].encode()).hexdigest() == lines["key_sha256"]
    assert len(lines["key"]) >= 40


def test_no_auth_config_means_no_credentials_needed(repo: tuple[Path, Gate], tmp_path: Path) -> None:
    server = ServerProcess(repo[0], tmp_path)
    try:
        assert http_infer(server, "digits", None).status_code == 200
        assert http_infer(server, "digits", "anything").status_code == 200
    finally:
        assert server.stop() == 0, server.log()

