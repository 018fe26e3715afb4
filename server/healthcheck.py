"""Exit 0 if an ortserve (or any gRPC health-checking server) answers SERVING: `python -m server.healthcheck`.

With TLS on the server: `--tls-ca` (the CA that issued the server's certificate; the address's host name
must match the certificate, or give `--tls-server-name`), plus `--tls-cert/--tls-key` under mutual TLS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:8001")
    parser.add_argument("--service", default="", help="service or model name; empty for the whole server")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--tls-ca", type=Path, help="connect over TLS, trusting this CA file (PEM)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="the client certificate's key (PEM)")
    parser.add_argument("--tls-server-name", help="the name to expect in the server's certificate")
    return parser


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS when a CA is given (a client certificate too under mutual TLS)."""
    if args.tls_ca is None:
        if args.tls_cert is not None or args.tls_key is not None:
            raise SystemExit("--tls-cert and --tls-key need --tls-ca")
        return grpc.insecure_channel(args.address)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(
        args.tls_ca.read_bytes(),
        args.tls_key.read_bytes() if args.tls_key is not None else None,
        args.tls_cert.read_bytes() if args.tls_cert is not None else None,
    )
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with _channel(args) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
