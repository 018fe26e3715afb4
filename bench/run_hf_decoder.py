"""A transformers decoder served with its own tokenizer: streaming load, and what tokenizing costs.

    python bench/run_hf_decoder.py [--levels 1 8 32] [--max-tokens 64] [--workdir DIR]

Builds the tests' tiny Llama (tests/hf_models.py: 2 layers, hidden 64, GQA 8/2 heads, a
384-token byte-level BPE tokenizer), exports it with `python -m exporters.hf`, starts
`ortserve serve` on it (one worker) and, for each number of concurrent streams N, runs N
clients over ortserve.v1.TextGeneration (gRPC), each max(2, min(16, 128 // N)) streams of
--max-tokens tokens back to back (temperature 0.8, top_k 40, seeded, EOS ignored). Reports
time to first token, inter-token latency (per token) and output tokens/s.

Tokenizer share: the model thread detokenizes every row of a step before the step's chunks
go out, so each stream's inter-token latency holds the detokenizing of all N rows. The share
is N x (the mean time of one Detokenizer.add over the ids the run produced, plus prompt
encoding spread over the output tokens) / the ITL p50 at N streams.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.rpc.pb import text_generation_pb2_grpc as gen_grpc  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import generation_load  # noqa: E402

PROMPTS = [
    "def ", "import os\n", "class Node:", "    return ", "if __name__ == ", "for i in range(", "# ", "with open(",
]


async def one_stream(stub: gen_grpc.TextGenerationStub, index: int, max_tokens: int) -> dict[str, object]:
    return await generation_load.one_stream(stub, index, max_tokens, model="llama", prompts=PROMPTS)


async def level(address: str, streams: int, max_tokens: int) -> dict[str, object]:
    per_client = max(2, min(16, 128 // streams))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        await one_stream(stub, 0, 4)  # warm the connection and the model

        async def client(c: int) -> list[dict[str, object]]:
            return [await one_stream(stub, c * per_client + i, max_tokens) for i in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(streams))) for r in rs]
        elapsed = time.perf_counter() - start
    tokens = sum(len(r["ids"]) for r in results)  # type: ignore[arg-type]
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    gaps = np.array([g for r in results for g in r["gaps"]]) * 1e3  # type: ignore[attr-defined]
    return {
        "streams": streams, "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
        "itl_p50": np.percentile(gaps, 50), "itl_p99": np.percentile(gaps, 99), "tokens_s": tokens / elapsed,
        "results": results,
    }


def tokenizer_cost_ms(model_dir: Path, results: list[dict[str, object]]) -> float:
    """Mean tokenizer time per output token (ms): detokenizing each id plus the prompt's encoding."""
    from server.core.tokenizer import HfTokenizer

    tokenizer = HfTokenizer(model_dir)
    start = time.perf_counter()
    count = 0
    for result in results:
        tokenizer.encode(str(result["prompt"]))
        detokenizer = tokenizer.detokenizer()
        for token in result["ids"]:  # type: ignore[attr-defined]
            detokenizer.add(token)
            count += 1
        detokenizer.flush()
    return (time.perf_counter() - start) * 1e3 / max(count, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path, help="where the model and repository go (default: a temp dir)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hf_bench_"))
    from tests.hf_models import build_llama

    source = build_llama(work / "src" / "llama")
    repo = work / "repo"
    subprocess.run([sys.executable, "-m", "exporters.hf", str(source), "--task", "text-generation-with-past",
                    "--repository", str(repo), "--name", "llama"], cwd=ROOT, check=True)
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
         "--port", "0", "--port-file", str(port_file), "--workers", "1", "--http-port", "0", "--metrics-port", "0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text()):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        print(f"{'streams':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'tok/s':>8} "
              f"{'tokenizer/token':>15} {'share of ITL':>12}")
        for streams in args.levels:
            row = asyncio.run(level(address, streams, args.max_tokens))
            cost = tokenizer_cost_ms(repo / "llama", row["results"])  # type: ignore[arg-type]
            share = streams * cost / float(row["itl_p50"])  # type: ignore[arg-type]
            print(f"{streams:>7} {row['ttft_p50']:>7.2f}ms {row['ttft_p99']:>7.2f}ms {row['itl_p50']:>6.2f}ms "
                  f"{row['itl_p99']:>6.2f}ms {row['tokens_s']:>8.0f} {cost * 1e3:>13.1f}us {share:>11.1%}")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
