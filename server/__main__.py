"""Command line: `ortserve serve --model-repository DIR [--host H] [--port P] [--device D]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.runtime import cpus
from server.settings import Settings, add_arguments, given_arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortserve", description="Serve ONNX models over the Open Inference Protocol.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model repository over gRPC and HTTP")
    serve.add_argument(
        "model", nargs="?", type=Path, metavar="PATH",
        help="a model repository, or one model (an .onnx file or a model folder) to serve alone; "
        "the same as --model-repository",
    )
    add_arguments(serve)  # one flag per Settings field
    hash_key = commands.add_parser(
        "hash-key", help="print the SHA-256 digest of an API key, for the auth config's key_sha256",
        description="Prints the digest an --auth-config file stores for an API key (the key itself is never "
        "stored). The key is read from standard input (one line), so it stays out of the shell's history "
        "and the process list; --generate makes a new random key and prints both.",
    )
    hash_key.add_argument("--generate", action="store_true", help="make a new random key (256 bits) and print it too")
    return parser


def _hash_key(generate: bool) -> None:
    import secrets

    from server.service.auth import hash_key

    if generate:
        key = secrets.token_urlsafe(32)
        print(f"key: {key}\nkey_sha256: {hash_key(key)}")
        return
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        sys.exit("ortserve hash-key: give the key on standard input (or --generate)")
    print(hash_key(line))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ortserve` console script."""
    # SIGHUP re-reads the auth config once the server runs; until its handler is in place, a SIGHUP
    # (a supervisor's reload reaching a worker that is still starting) must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        _hash_key(args.generate)
        return
    given = given_arguments(args)
    if args.model is not None:
        if "model_repository" in given:
            sys.exit("ortserve: give the model path or --model-repository, not both")
        given["model_repository"] = args.model
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        sys.exit(f"ortserve: invalid settings:\n{exc}")
    from server.logs import configure

    configure(settings.log_level, settings.log_format)
    from server.memory import tune_allocator

    tune_allocator()
    single = None
    if settings.worker_index is None:
        from server.repository.single import build_repository, is_single_model, model_name_for

        if is_single_model(settings.model_repository):
            try:
                name = model_name_for(settings.model_repository, settings.model_name)
            except ValueError as exc:
                sys.exit(f"ortserve: {exc}")
            single = build_repository(settings.model_repository, name)
            logging.getLogger("server").info(
                "serving %s alone as model '%s' (from the temporary repository %s)", settings.model_repository, name,
                single,
            )
            settings = settings.model_copy(update={"model_repository": single})
        elif settings.model_name is not None:
            sys.exit("ortserve: --model-name names a model served alone; the path is a repository")
    try:
        _serve(settings)
    finally:
        if single is not None:
            shutil.rmtree(single, ignore_errors=True)


def _serve(settings: Settings) -> None:
    if settings.auth_config is not None and settings.worker_index is None:
        from server.service.auth import Authenticator
        from server.service.auth_config import AuthConfigError

        try:  # checked once here (the JWKS too), before any worker starts, for a clear message
            Authenticator(settings.auth_config)
        except AuthConfigError as exc:
            sys.exit(f"ortserve: {exc}")
    if settings.worker_index is None and settings.resolved_workers() > 1:
        settings = settings.model_copy(update={"workers": settings.resolved_workers()})
        from server.workers import supervise

        sys.exit(supervise(settings))
    if settings.worker_index is not None:
        cpus.share_among(settings.workers)
        if settings.cpu_affinity == "auto":
            cpus.pin_worker(settings.worker_index, settings.workers)  # before any thread of gRPC or ONNX Runtime
    from server.app import serve  # imported late so --help works without loading ONNX Runtime

    try:
        _run(serve(settings), settings.event_loop)
    except KeyboardInterrupt:
        pass


def _run(main_coroutine: Coroutine[Any, Any, None], event_loop: str) -> None:
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                sys.exit("ortserve: --event-loop uvloop, but uvloop is not installed")
        else:
            uvloop.run(main_coroutine)
            return
    asyncio.run(main_coroutine)


if __name__ == "__main__":
    main()
