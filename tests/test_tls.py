"""TLS and mutual TLS on the gRPC, HTTP and metrics ports, through real clients, and certificate rotation.

Certificates are made here with `cryptography` (a test CA, server and client certificates, a second CA
whose certificates the server must refuse, an expired server certificate). Which certificate a port
presents is read from a fresh TLS handshake (`ssl`, the peer certificate's serial number), so rotation
is checked on what a new client sees, while an open stream goes on and finishes.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc
from tests.conftest import ROOT, ServerProcess
from tests.gate import Gate, gate_config, wait_until
from tests.test_grpcurl_and_health import GRPCURL

MODEL = "bytes_decoder"
GATED = "bytes_decoder_gated"
# Generous: reached only when something is broken.
WAIT_S = 120.0


# --- certificates ---------------------------------------------------------------------------------------------


@dataclass
class Issued:
    """A certificate and its key, written as PEM files."""

    cert: Path
    key: Path
    serial: int


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(cert_path, key_path, cert.serial_number)


class Authority:
    """A test CA that issues server and client certificates."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = directory / f"{name.replace(' ', '_')}.pem"
        directory.mkdir(parents=True, exist_ok=True)
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, server: bool = True, expired: bool = False) -> Issued:
        """A certificate for localhost and 127.0.0.1 (server) or a client; `expired`: it ended yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)) if expired else (
            now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(_name("localhost" if server else stem))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(self.directory, stem, builder.sign(self.key, hashes.SHA256()), key)


@dataclass
class Pki:
    ca: Authority
    other_ca: Authority
    client: Issued
    other_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority(directory, "test ca"), Authority(directory, "other ca")
    return Pki(ca, other, ca.issue("client", server=False), other.issue("other-client", server=False))


def install(issued: Issued, cert: Path, key: Path) -> None:
    """Puts a certificate and key in place the way a deployment would: temporary names, then renames."""
    for source, target in ((issued.key, key), (issued.cert, cert)):
        temporary = target.with_name(target.name + ".new")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)


# --- servers and clients ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Gate]:
    """The example text model, plus a copy whose runs a test can hold (tests/gate.py)."""
    root = tmp_path_factory.mktemp("tls_repo")
    shutil.copytree(ROOT / "model_repository" / MODEL, root / MODEL)
    gated = root / GATED
    shutil.copytree(ROOT / "model_repository" / MODEL, gated)
    gate_dir = root.parent / f"{root.name}-gate"
    gate = Gate(gate_dir)  # the directory must exist when the model loads
    config = (gated / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{GATED}"')
    (gated / "config.pbtxt").write_text(config + "\n" + gate_config(gate_dir) + "\n")
    return root, gate


def tls_server(
    repo: tuple[Path, Gate], workdir: Path, issued: Issued, *extra: str, client_ca: Path | None = None,
) -> tuple[ServerProcess, Path, Path]:
    """A server over TLS with `issued` installed as its certificate; returns it and the live cert and key paths."""
    cert, key = workdir / "tls" / "server.crt", workdir / "tls" / "server.key"
    cert.parent.mkdir(parents=True, exist_ok=True)
    install(issued, cert, key)
    flags = ["--tls-cert", str(cert), "--tls-key", str(key)]
    if client_ca is not None:
        flags += ["--tls-client-ca", str(client_ca)]
    return ServerProcess(repo[0], workdir, *flags, *extra), cert, key


@pytest.fixture(scope="module")
def tls(repo: tuple[Path, Gate], pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server, _, _ = tls_server(repo, tmp_path_factory.mktemp("tls"), pki.ca.issue("tls-server"))
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def mtls(repo: tuple[Path, Gate], pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server, _, _ = tls_server(
        repo, tmp_path_factory.mktemp("mtls"), pki.ca.issue("mtls-server"), client_ca=pki.ca.pem,
    )
    yield server
    assert server.stop() == 0, server.log()


def client_context(ca: Path, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def presented_serial(port: int, ca: Path, client: Issued | None = None, grpc_port: bool = False) -> int:
    """The serial number of the certificate that a new connection to `port` is shown."""
    context = client_context(ca, client)
    if grpc_port:
        context.set_alpn_protocols(["h2"])  # gRPC servers insist on HTTP/2 negotiated
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls_socket:
            der = tls_socket.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def grpc_channel(server: ServerProcess, ca: Path, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        ca.read_bytes(),
        client.key.read_bytes() if client is not None else None,
        client.cert.read_bytes() if client is not None else None,
    )
    return grpc.secure_channel(f"localhost:{server.port}", credentials)


def https(server: ServerProcess, port: int | None = None) -> str:
    return f"https://localhost:{port or server.http_port}"


def generate(stub: gen_grpc.TextGenerationStub, model: str = MODEL, max_tokens: int = 4) -> list[Any]:
    request = gen_pb.GenerateRequest(model=model, prompt="def ", max_tokens=max_tokens, ignore_eos=True)
    return list(stub.Generate(request, timeout=WAIT_S))


def grpcurl(server: ServerProcess, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, *flags, f"localhost:{server.port}", "inference.GRPCInferenceService/ServerReady"],
        capture_output=True, text=True, timeout=WAIT_S,
    )


# --- TLS: accepted ---------------------------------------------------------------------------------------------


def test_tritonclient_grpc_with_root_certificates(tls: ServerProcess, pki: Pki) -> None:
    client = grpcclient.InferenceServerClient(
        f"localhost:{tls.port}", ssl=True, root_certificates=str(pki.ca.pem),
    )
    try:
        assert client.is_server_ready()
        assert client.get_model_metadata(MODEL).name == MODEL
    finally:
        client.close()


def test_generate_stream_over_tls(tls: ServerProcess, pki: Pki) -> None:
    with grpc_channel(tls, pki.ca.pem) as channel:
        responses = generate(gen_grpc.TextGenerationStub(channel))
    assert responses[-1].finish_reason == "length" and responses[-1].completion_tokens == 4


def test_tritonclient_http_over_https(tls: ServerProcess, pki: Pki) -> None:
    client = httpclient.InferenceServerClient(
        f"localhost:{tls.http_port}", ssl=True, ssl_options={"ca_certs": str(pki.ca.pem)},
    )
    try:
        assert client.is_server_ready()
        assert client.get_model_metadata(MODEL)["name"] == MODEL
    finally:
        client.close()


def test_grpcurl_with_cacert(tls: ServerProcess, pki: Pki) -> None:
    result = grpcurl(tls, "-cacert", str(pki.ca.pem))
    assert result.returncode == 0, result.stderr
    assert '"ready": true' in result.stdout


def test_openai_client_over_https(tls: ServerProcess, pki: Pki) -> None:
    with httpx.Client(verify=client_context(pki.ca.pem)) as http, openai.OpenAI(
        base_url=f"{https(tls)}/v1", api_key="unused", http_client=http, max_retries=0,
    ) as client:
        completion = client.completions.create(
            model=MODEL, prompt="def ", max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
        )
    assert completion.usage is not None and completion.usage.completion_tokens == 4


def test_metrics_port_over_https(tls: ServerProcess, pki: Pki) -> None:
    response = httpx.get(f"{https(tls, tls.metrics_port)}/metrics", verify=client_context(pki.ca.pem), timeout=60)
    assert response.status_code == 200 and "nv_inference_count" in response.text


def test_healthcheck_over_tls(tls: ServerProcess, pki: Pki) -> None:
    command = [sys.executable, "-m", "server.healthcheck", "--address", f"localhost:{tls.port}"]
    result = subprocess.run(
        [*command, "--tls-ca", str(pki.ca.pem)], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S,
    )
    assert result.returncode == 0 and result.stdout.strip() == "SERVING", result.stderr
    # The address by IP, the name checked against the certificate's DNS name.
    by_ip = [sys.executable, "-m", "server.healthcheck", "--address", tls.address, "--tls-ca", str(pki.ca.pem),
             "--tls-server-name", "localhost"]
    assert subprocess.run(by_ip, cwd=ROOT, capture_output=True, timeout=WAIT_S).returncode == 0


# --- TLS: refused ----------------------------------------------------------------------------------------------


def test_our_command_line_client_over_mutual_tls(mtls: ServerProcess, pki: Pki) -> None:
    """clients/generate.py with --tls-ca and a client certificate (ortserve_client.connection, which predict.py
    shares); without them the handshake is refused."""
    generate = [sys.executable, str(ROOT / "clients" / "generate.py"), "--url", f"localhost:{mtls.port}",
                "--max-tokens", "4", "--ignore-eos", "--timeout-s", "30"]
    tls = ["--tls-ca", str(pki.ca.pem), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    streamed = subprocess.run([*generate, *tls, "def "], capture_output=True, text=True, timeout=WAIT_S)
    assert streamed.returncode == 0 and "completion 4 tokens" in streamed.stderr, streamed.stderr
    plaintext = subprocess.run([*generate, "def "], capture_output=True, text=True, timeout=WAIT_S)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr


def test_the_node_client_over_mutual_tls(mtls: ServerProcess, pki: Pki) -> None:
    """clients/node's generate.js with --tls-ca and a client certificate; without them the handshake is refused."""
    command = ["node", "generate.js", "--url", f"localhost:{mtls.port}", "--max-tokens", "4", "--ignore-eos",
               "--timeout-s", "30"]
    tls = ["--tls-ca", str(pki.ca.pem), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    node_dir = ROOT / "clients" / "node"
    streamed = subprocess.run([*command, *tls, "def "], cwd=node_dir, capture_output=True, text=True, timeout=WAIT_S)
    assert streamed.returncode == 0 and "completion 4 tokens" in streamed.stderr, streamed.stderr
    plaintext = subprocess.run([*command, "def "], cwd=node_dir, capture_output=True, text=True, timeout=WAIT_S)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr


def test_plaintext_clients_are_refused(tls: ServerProcess) -> None:
    with grpc.insecure_channel(tls.address) as channel, pytest.raises(grpc.RpcError) as err:
        generate(gen_grpc.TextGenerationStub(channel))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for port in (tls.http_port, tls.metrics_port):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30)
    result = subprocess.run([GRPCURL, "-plaintext", tls.address, "list"], capture_output=True, timeout=WAIT_S)
    assert result.returncode != 0


def test_clients_that_do_not_trust_the_issuer_refuse_the_server(tls: ServerProcess, pki: Pki) -> None:
    with grpc_channel(tls, pki.other_ca.pem) as channel, pytest.raises(grpc.RpcError) as err:
        generate(gen_grpc.TextGenerationStub(channel))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https(tls)}/v2/health/ready", verify=client_context(pki.other_ca.pem), timeout=30)


def test_an_expired_server_certificate_is_refused_by_clients(
    repo: tuple[Path, Gate], pki: Pki, tmp_path: Path,
) -> None:
    server, _, _ = tls_server(repo, tmp_path, pki.ca.issue("expired", expired=True), "--allow-metrics", "false")
    try:
        with grpc_channel(server, pki.ca.pem) as channel, pytest.raises(grpc.RpcError) as err:
            generate(gen_grpc.TextGenerationStub(channel))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(httpx.ConnectError, match="expired"):
            httpx.get(f"{https(server)}/v2/health/ready", verify=client_context(pki.ca.pem), timeout=30)
        assert grpcurl(server, "-cacert", str(pki.ca.pem)).returncode != 0
    finally:
        assert server.stop() == 0, server.log()


# --- mutual TLS --------------------------------------------------------------------------------------------------


def test_mtls_accepts_clients_with_a_certificate_from_the_ca(mtls: ServerProcess, pki: Pki) -> None:
    client = grpcclient.InferenceServerClient(
        f"localhost:{mtls.port}", ssl=True, root_certificates=str(pki.ca.pem),
        private_key=str(pki.client.key), certificate_chain=str(pki.client.cert),
    )
    try:
        assert client.is_server_ready()
    finally:
        client.close()
    http_client = httpclient.InferenceServerClient(
        f"localhost:{mtls.http_port}", ssl=True,
        ssl_options={"ca_certs": str(pki.ca.pem), "certfile": str(pki.client.cert), "keyfile": str(pki.client.key)},
    )
    try:
        assert http_client.is_server_ready()
    finally:
        http_client.close()
    result = grpcurl(mtls, "-cacert", str(pki.ca.pem), "-cert", str(pki.client.cert), "-key", str(pki.client.key))
    assert result.returncode == 0, result.stderr
    context = client_context(pki.ca.pem, pki.client)
    assert httpx.get(f"{https(mtls, mtls.metrics_port)}/metrics", verify=context, timeout=60).status_code == 200
    health = [sys.executable, "-m", "server.healthcheck", "--address", f"localhost:{mtls.port}",
              "--tls-ca", str(pki.ca.pem), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    assert subprocess.run(health, cwd=ROOT, capture_output=True, timeout=WAIT_S).returncode == 0


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_mtls_refuses_clients_without_a_certificate_from_the_ca(mtls: ServerProcess, pki: Pki, who: str) -> None:
    client = None if who == "no certificate" else pki.other_client
    with grpc_channel(mtls, pki.ca.pem, client) as channel, pytest.raises(grpc.RpcError) as err:
        generate(gen_grpc.TextGenerationStub(channel))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for port in (mtls.http_port, mtls.metrics_port):
        # TLS 1.3: the server's refusal may reach the client after its side of the handshake, at the first read.
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"{https(mtls, port)}/v2/health/ready", verify=client_context(pki.ca.pem, client), timeout=30)
    flags = ["-cacert", str(pki.ca.pem)]
    if client is not None:
        flags += ["-cert", str(client.cert), "-key", str(client.key)]
    assert grpcurl(mtls, *flags).returncode != 0


# --- settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["cert alone", "client CA alone", "missing file", "key of another certificate"])
def test_bad_tls_settings_stop_the_start_with_a_clear_message(pki: Pki, tmp_path: Path, case: str) -> None:
    one, two = pki.ca.issue("one"), pki.ca.issue("two")
    flags = {
        "cert alone": ["--tls-cert", str(one.cert)],
        "client CA alone": ["--tls-client-ca", str(pki.ca.pem)],
        "missing file": ["--tls-cert", str(one.cert), "--tls-key", str(tmp_path / "absent.key")],
        "key of another certificate": ["--tls-cert", str(one.cert), "--tls-key", str(two.key)],
    }[case]
    expected = {
        "cert alone": "tls_cert and tls_key go together",
        "client CA alone": "tls_client_ca (mutual TLS) needs tls_cert and tls_key",
        "missing file": "is not a readable file",
        "key of another certificate": "could not load the certificate",
    }[case]
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(tmp_path), "--workers", "1", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S,
    )
    assert result.returncode != 0 and expected in result.stderr, result.stderr


# --- rotation ----------------------------------------------------------------------------------------------------


def serials(server: ServerProcess, pki: Pki) -> set[int]:
    """What new connections to each of the three ports are shown now."""
    return {
        presented_serial(server.port, pki.ca.pem, grpc_port=True),
        presented_serial(server.http_port, pki.ca.pem),
        presented_serial(server.metrics_port, pki.ca.pem),
    }


def test_rotation_while_streams_are_open(repo: tuple[Path, Gate], pki: Pki, tmp_path: Path) -> None:
    """Open gRPC and HTTP streams finish on their connections; new connections see the new certificate;
    a pair that does not load is refused with an error in the log, the current certificate staying."""
    first = pki.ca.issue("first")
    server, cert, key = tls_server(repo, tmp_path, first)
    gate = repo[1]
    try:
        assert serials(server, pki) == {first.serial}
        results: dict[str, Any] = {}
        received: queue.Queue[Any] = queue.Queue()

        def stream_grpc(channel: grpc.Channel) -> None:
            request = gen_pb.GenerateRequest(model=GATED, prompt="def ", max_tokens=8, ignore_eos=True)
            for response in gen_grpc.TextGenerationStub(channel).Generate(request, timeout=WAIT_S):
                received.put(response)
            received.put(None)

        with grpc_channel(server, pki.ca.pem) as channel, httpx.Client(
            verify=client_context(pki.ca.pem), timeout=WAIT_S,
        ) as http:
            with gate.held():
                seen = len(gate.entered())
                grpc_stream = threading.Thread(target=stream_grpc, args=(channel,))
                grpc_stream.start()
                # The stream's prefill and first decode step go through; the next step is held: the stream is open.
                for _ in range(2):
                    gate.release(gate.wait_entered(seen))
                    seen += 1
                assert received.get(timeout=WAIT_S) is not None
                gate.wait_entered(seen)
                # An HTTP connection made on the first certificate (keep-alive), then a stream on it, queued behind.
                assert http.get(f"{https(server)}/v2/health/ready").status_code == 200
                http_stream = threading.Thread(target=lambda: results.update(http=_sse_completion(server, http)))
                http_stream.start()

                broken = pki.ca.issue("broken")
                shutil.copyfile(pki.ca.issue("unrelated").key, broken.key)  # a key that is not the certificate's
                install(broken, cert, key)
                wait_until(lambda: "TLS certificate reload from" in server.log(), "the failed reload's error", WAIT_S)
                assert serials(server, pki) == {first.serial}

                second = pki.ca.issue("second")
                install(second, cert, key)
                wait_until(lambda: serials(server, pki) == {second.serial}, "new connections to see the new one",
                           WAIT_S)
            # The gate opens: both streams, on connections made with the first certificate, run to their end.
            grpc_stream.join(WAIT_S)
            http_stream.join(WAIT_S)
            responses = []
            while (item := received.get(timeout=WAIT_S)) is not None:
                responses.append(item)
            assert responses[-1].finish_reason == "length" and responses[-1].completion_tokens == 8
            text, serial = results["http"]
            assert text.endswith("data: [DONE]") and serial == first.serial
        assert "TLS certificate reloaded from" in server.log()
        with grpc_channel(server, pki.ca.pem) as channel:
            assert generate(gen_grpc.TextGenerationStub(channel))[-1].completion_tokens == 4
    finally:
        assert server.stop() == 0, server.log()


def _sse_completion(server: ServerProcess, http: httpx.Client) -> tuple[str, int]:
    """A streamed completion's text, and the serial of the certificate its connection was made with."""
    body = {"model": GATED, "prompt": "def ", "max_tokens": 4, "stream": True, "ignore_eos": True}
    with http.stream("POST", f"{https(server)}/v1/completions", json=body) as response:
        assert response.status_code == 200
        tls_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        serial = x509.load_der_x509_certificate(tls_object.getpeercert(True)).serial_number
        return "".join(response.iter_text()).strip(), serial


def test_rotation_reaches_every_worker(repo: tuple[Path, Gate], pki: Pki, tmp_path: Path) -> None:
    """With two workers sharing the ports, each reloads: new connections keep seeing only the new certificate."""
    first = pki.ca.issue("w-first")
    server, cert, key = tls_server(repo, tmp_path, first, "--workers", "2")
    try:
        with grpc_channel(server, pki.ca.pem) as channel:
            assert generate(gen_grpc.TextGenerationStub(channel))[-1].completion_tokens == 4
        second = pki.ca.issue("w-second")
        install(second, cert, key)
        # Connections spread over the workers (SO_REUSEPORT); eight in a row per port, all new, cover both
        # workers but for a 1-in-128 chance per port.
        wait_until(lambda: all(serials(server, pki) == {second.serial} for _ in range(8)),
                   "every worker to present the new certificate", WAIT_S)
        client = httpclient.InferenceServerClient(
            f"localhost:{server.http_port}", ssl=True, ssl_options={"ca_certs": str(pki.ca.pem)},
        )
        try:
            assert client.is_server_ready()
        finally:
            client.close()
    finally:
        assert server.stop() == 0, server.log()
