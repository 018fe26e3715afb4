"""How the command-line clients reach a server: plaintext or TLS (mutual TLS too), with or without an API key.

    --tls-ca ca.crt [--tls-cert client.crt --tls-key client.key] [--tls-server-name localhost]
    --api-key KEY          (or the ORTSERVE_API_KEY environment variable, which keeps it out of `ps`)

The key (or an OAuth2 access token) travels as `authorization: Bearer <key>` metadata on every call, as the
server's --auth-config expects.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import grpc

API_KEY_ENV = "ORTSERVE_API_KEY"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --api-key and the --tls-* options to a command line."""
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"API key or access token sent as a bearer credential (default: ${API_KEY_ENV})")
    parser.add_argument("--tls-ca", type=Path, help="TLS: the CA certificate(s) that issued the server's (PEM)")
    parser.add_argument("--tls-cert", type=Path, help="mutual TLS: this client's certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="mutual TLS: this client's private key (PEM)")
    parser.add_argument("--tls-server-name", help="TLS: the name to check the server's certificate against")


def open_channel(args: argparse.Namespace, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to args.url: TLS when --tls-ca (or a client certificate) is given, else plaintext."""
    channel_options = list(options)
    if args.tls_ca is None and args.tls_cert is None:
        return grpc.insecure_channel(args.url, options=channel_options)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes() if args.tls_ca is not None else None,
        private_key=args.tls_key.read_bytes() if args.tls_key is not None else None,
        certificate_chain=args.tls_cert.read_bytes() if args.tls_cert is not None else None,
    )
    if args.tls_server_name:
        channel_options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.url, credentials, options=channel_options)


def call_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: the bearer credential when a key was given."""
    return (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
