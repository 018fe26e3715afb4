"""Stream a completion from an ortserve text-generation model to the terminal as it arrives.

Examples:
    python -m ortserve_client.generate "def fibonacci(n):"
    python -m ortserve_client.generate --temperature 0.8 --top-k 40 --seed 1 --max-tokens 120 "import "
    python -m ortserve_client.generate --stop "\\n\\n" "class Stack:"
"""

from __future__ import annotations

import argparse
import sys

import grpc

from ortserve_client.connection import add_connection_arguments, call_metadata, open_channel
from ortserve_client.pb import text_generation_pb2 as gen_pb
from ortserve_client.pb import text_generation_pb2_grpc as gen_grpc


def build_request(args: argparse.Namespace) -> gen_pb.GenerateRequest:
    """A GenerateRequest from the command line; optional settings are set only when given (else the model's)."""
    request = gen_pb.GenerateRequest(
        model=args.model, model_version=args.model_version, prompt=args.prompt, max_tokens=args.max_tokens,
        top_k=args.top_k, stop=[s.encode().decode("unicode_escape") for s in args.stop], ignore_eos=args.ignore_eos,
    )
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(request, name, value)
    return request


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--model", default="bytes_decoder")
    parser.add_argument("--model-version", default="")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, help="0 is greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable; \\n escapes work)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    add_connection_arguments(parser)
    return parser


def stream(
    stub: gen_grpc.TextGenerationStub, request: gen_pb.GenerateRequest, timeout_s: float,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Writes each response's new text to stdout as it arrives; the finish summary goes to stderr."""
    for response in stub.Generate(request, timeout=timeout_s, metadata=metadata):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        if response.finish_reason:
            print(
                f"\n[finish: {response.finish_reason}; prompt {response.prompt_tokens} tokens, "
                f"completion {response.completion_tokens} tokens]",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (1 on an RPC error)."""
    args = _parser().parse_args(argv)
    with open_channel(args) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        sys.stdout.write(args.prompt)
        try:
            stream(stub, build_request(args), args.timeout_s, call_metadata(args))
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
