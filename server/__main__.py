"""Command line: `ortserve serve --model-repository DIR [--host H] [--port P] [--device D]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from server.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortserve", description="Serve ONNX models over the Open Inference Protocol.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model repository over gRPC")
    serve.add_argument("--model-repository", type=Path, help="model repository directory (default: model_repository)")
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="gRPC port (default 8001; 0 picks a free port)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once ready")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="execution device (default auto)")
    serve.add_argument("--max-receive-message-bytes", type=int, help="largest request accepted (default 1 GiB)")
    serve.add_argument("--default-max-batch-size", type=int, help="max_batch_size for auto-completed models (default 64)")
    serve.add_argument("--strict-readiness", choices=["true", "false"], help="ready only when every model is (default true)")
    serve.add_argument("--shutdown-grace-s", type=float, help="seconds in-flight requests get at shutdown (default 10)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ortserve` console script."""
    args = _parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "command"}
    if "strict_readiness" in given:
        given["strict_readiness"] = given["strict_readiness"] == "true"
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        sys.exit(f"ortserve: invalid settings:\n{exc}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from server.app import serve  # imported late so --help works without loading ONNX Runtime

    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
