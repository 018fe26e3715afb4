"""Command line: `ortserve serve --model-repository DIR [--host H] [--port P] [--device D]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortserve", description="Serve ONNX models over the Open Inference Protocol.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model repository over gRPC and HTTP")
    serve.add_argument("--model-repository", type=Path, help="model repository directory (default: model_repository)")
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="gRPC port (default 8001; 0 picks a free port)")
    serve.add_argument("--port-file", type=Path, help="write the bound gRPC port here once ready (HTTP: PATH.http)")
    serve.add_argument("--allow-http", choices=["true", "false"], help="serve HTTP beside gRPC (default true)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0 picks a free port)")
    serve.add_argument(
        "--http-max-body-bytes", type=int, help="largest HTTP request body (default: --max-receive-message-bytes)"
    )
    serve.add_argument("--allow-metrics", choices=["true", "false"], help="serve Prometheus metrics (default true)")
    serve.add_argument("--metrics-port", type=int, help="metrics port (default 8002; 0 picks a free port)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="execution device (default auto)")
    serve.add_argument("--max-receive-message-bytes", type=int, help="largest request accepted (default 1 GiB)")
    serve.add_argument("--max-send-message-bytes", type=int, help="largest response sent (default 1 GiB)")
    serve.add_argument("--default-max-batch-size", type=int, help="max_batch_size for auto-completed models (default 64)")
    serve.add_argument("--strict-readiness", choices=["true", "false"], help="ready only when every model is (default true)")
    serve.add_argument("--shutdown-grace-s", type=float, help="seconds in-flight requests get at shutdown (default 10)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"], help="text (default) or one JSON object per line")
    serve.add_argument("--log-requests", choices=["true", "false"], help="write an access log line per request")
    serve.add_argument("--model-control-mode", choices=["none", "poll", "explicit"], help="default none")
    serve.add_argument("--repository-poll-secs", type=float, help="poll mode scan interval (default 15)")
    serve.add_argument("--load-model", action="append", help="explicit mode: model to load at start (repeatable; * for all)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (default 0: auto, 2 on 2+ cores)")
    serve.add_argument("--event-loop", choices=["auto", "asyncio", "uvloop"], help="default auto: uvloop if installed")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--peer-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ortserve` console script."""
    args = _parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    for flag in ("strict_readiness", "allow_http", "allow_metrics", "log_requests"):
        if flag in given:
            given[flag] = given[flag] == "true"
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        sys.exit(f"ortserve: invalid settings:\n{exc}")
    from server.logs import configure

    configure(settings.log_level, settings.log_format)
    from server.memory import tune_allocator

    tune_allocator()
    if settings.worker_index is None and settings.resolved_workers() > 1:
        settings = settings.model_copy(update={"workers": settings.resolved_workers()})
        from server.workers import supervise

        sys.exit(supervise(settings))
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
