"""Property-based fuzzing of a live server, longer than the suite's run (tests/test_property.py).

Builds the test model repository, starts `ortserve serve` on it, and runs the same hypothesis
strategies: generated ModelInferRequests (on ModelInfer and ModelStreamInfer), raw random bodies
on every RPC path, well-formed requests that must succeed, and generated sampling settings for the
text model (tests/test_property_generation.py) on ModelInfer, ModelStreamInfer and Generate.
Prints the answers by status code; exits 1 on any UNKNOWN or INTERNAL answer (hypothesis prints
the smallest request that gives it) or when the server dies.

    .venv/bin/python bench/fuzz.py --examples 5000 [--seed 7]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ServerProcess, build_repository  # noqa: E402
from tests.test_property import FIXED_GOOD, check_alive, make_checks  # noqa: E402
from tests.test_property_generation import MODEL, check_generation_alive, make_generation_checks  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per strategy (default 2000)")
    parser.add_argument("--seed", type=int, default=None, help="explore other examples (default: derandomized)")
    args = parser.parse_args()

    seen: Counter[str] = Counter()
    failure = ""
    with tempfile.TemporaryDirectory(prefix="ortserve-fuzz-") as tmp:
        repository = build_repository(Path(tmp) / "model_repository")
        shutil.copytree(ROOT / "model_repository" / MODEL, repository.path / MODEL)
        workdir = Path(tmp) / "server"
        workdir.mkdir()
        server = ServerProcess(repository.path, workdir, "--strict-readiness", "false")
        try:
            with grpc.insecure_channel(server.address) as channel:
                checks = make_checks(channel, seen, args.examples, args.seed)
                checks += make_generation_checks(channel, seen, args.examples, args.seed)
                for check in checks:
                    name = getattr(check, "__name__", "check")
                    print(f"running {name} ({args.examples} examples)", flush=True)
                    try:
                        check()
                    except Exception as exc:  # hypothesis has printed the falsifying example
                        failure = f"{name}: {type(exc).__name__}: {str(exc)[:2000]}"
                        break
                if server.process.poll() is not None:
                    failure = failure or f"server exited with {server.process.returncode}"
                else:
                    try:
                        check_alive(channel, FIXED_GOOD)
                        check_generation_alive(channel)
                    except (grpc.RpcError, AssertionError) as exc:
                        failure = failure or f"server not answering after the run: {exc}"
        finally:
            code = server.stop()
            if code != 0:
                failure = failure or f"server exited with {code} on SIGTERM"
            if failure:
                print(server.log()[-4000:], file=sys.stderr)
    total = sum(seen.values())
    print(f"\n{total} answers by status code:")
    for name, count in seen.most_common():
        print(f"  {name:<20} {count}")
    if failure:
        print(f"\nFAILED: {failure}")
        return 1
    print("\nno UNKNOWN or INTERNAL answer; the server stayed alive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
