"""Streaming generation benchmark: our own async gRPC load generator plus the in-process decode limit.

    python bench/generation_load.py [--url 127.0.0.1:8001] [--levels 1 8 32 64] [--max-tokens 64]

Without --url it starts `ortserve serve` on the example repository itself. For each number of concurrent
streams N, N clients each run max(2, min(16, 128 // N)) streams back to back on ortserve.v1.TextGeneration; it reports time to first
token, inter-token latency (per token), end-to-end latency (p50/p99) and output tokens/s. Right before and
right after each level it runs ONNX Runtime alone on batched decode steps of the same model (batch N, past
length 64) in this process, and reports their mean as that level's in-process limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.rpc.pb import text_generation_pb2 as gen_pb  # noqa: E402
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc  # noqa: E402

PROMPTS = ["def ", "import os\n", "class ", "    return ", "if __name__ == ", "for i in range(", "# ", "with open("]


async def one_stream(stub: gen_grpc.TextGenerationStub, index: int, max_tokens: int) -> dict[str, object]:
    request = gen_pb.GenerateRequest(
        model="bytes_decoder", prompt=PROMPTS[index % len(PROMPTS)], max_tokens=max_tokens,
        temperature=0.8, top_k=40, seed=index, ignore_eos=True,
    )
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    async for response in stub.Generate(request, timeout=600):
        arrivals.append((time.perf_counter(), len(response.token_ids)))
    end = time.perf_counter()
    gaps = []
    for (previous, _), (now, tokens) in zip(arrivals, arrivals[1:]):
        gaps += [(now - previous) / max(tokens, 1)] * max(tokens, 1)
    return {"ttft": arrivals[0][0] - start, "gaps": gaps, "e2e": end - start, "tokens": sum(t for _, t in arrivals)}


async def level(address: str, streams: int, max_tokens: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)

        # Each user runs streams back to back, so the batch stays full while streams come and
        # go: 16 each at low levels (one stream's ITL percentiles then rest on ~1,000 gaps),
        # fewer at high ones but at least 2, and about 128 streams in all. The ramps at the
        # start and end of a level (the batch filling, the last streams finishing alone) then
        # weigh less than they would over one round.
        rounds = max(2, min(16, 128 // streams))

        async def user(i: int) -> list[dict[str, object]]:
            return [await one_stream(stub, i * rounds + k, max_tokens) for k in range(rounds)]

        start = time.perf_counter()
        results = [r for batch in await asyncio.gather(*(user(i) for i in range(streams))) for r in batch]
        wall = time.perf_counter() - start
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    gaps = np.array([g for r in results for g in r["gaps"]]) * 1e3  # type: ignore[attr-defined]
    e2e = np.array([r["e2e"] for r in results]) * 1e3
    tokens = sum(int(r["tokens"]) for r in results)  # type: ignore[call-overload]
    return {
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
        "itl_p50": float(np.percentile(gaps, 50)), "itl_p99": float(np.percentile(gaps, 99)),
        "e2e_p50": float(np.percentile(e2e, 50)), "tokens_per_s": tokens / wall,
    }


class InProcessDecoder:
    """ONNX Runtime alone on batched decode steps of the example decoder (past length 64)."""

    def __init__(self) -> None:
        from server.runtime.onnx import OnnxRuntimeSession, SessionOptions

        model_dir = ROOT / "model_repository" / "bytes_decoder"
        self.info = json.loads((model_dir / "generation.json").read_text())
        self.session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
        layers = self.info["num_layers"]
        self.names = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]

    def step(self, batch: int, past: int = 64, seconds: float = 2.0) -> tuple[float, float]:
        """Returns (ms per decode step, tokens/s) for `batch` rows."""
        feed = {
            "input_ids": np.full((batch, 1), 65, np.int64),
            "attention_mask": np.ones((batch, past + 1), np.int64),
            "position_ids": np.full((batch, 1), past, np.int64),
        }
        shape = (batch, self.info["num_heads"], past, self.info["head_dim"])
        for i in range(self.info["num_layers"]):
            feed[f"past_key_values.{i}.key"] = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
            feed[f"past_key_values.{i}.value"] = np.random.default_rng(i + 100).standard_normal(shape).astype(np.float32)
        for _ in range(5):
            self.session.run(feed, self.names)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.session.run(feed, self.names)
            steps += 1
        step_s = (time.perf_counter() - start) / steps
        return step_s * 1e3, batch / step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    server = None
    address = args.url
    if address is None:
        port_file = ROOT / "bench" / "out" / "gen_port"
        port_file.parent.mkdir(exist_ok=True)
        port_file.unlink(missing_ok=True)
        server = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "1",
             "--port-file", str(port_file), "--log-level", "warning"], cwd=ROOT,
        )
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
    # The machine's speed drifts over minutes, so the in-process limit for each level is
    # measured right before and right after that level's load and averaged.
    decoder = InProcessDecoder()
    rows = []
    try:
        for n in args.levels:
            before = decoder.step(n)
            r = asyncio.run(level(address, n, args.max_tokens))
            after = decoder.step(n)
            r["step_ms"] = (before[0] + after[0]) / 2
            r["limit"] = (before[1] + after[1]) / 2
            rows.append((n, r))
            print(f"measured {n} streams: {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    print("| streams | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | e2e p50 ms | output tokens/s "
          "| in-process step ms (batch = streams, past 64) | in-process tokens/s | share of in-process |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows:
        print(f"| {n} | {r['ttft_p50']:.1f} | {r['ttft_p99']:.1f} | {r['itl_p50']:.2f} | {r['itl_p99']:.2f} | "
              f"{r['e2e_p50']:.0f} | {r['tokens_per_s']:.0f} | {r['step_ms']:.2f} | {r['limit']:.0f} | "
              f"{r['tokens_per_s'] / r['limit']:.0%} |")
    by_level = dict(rows)
    if 1 in by_level:
        one = by_level[1]
        print(f"\nsingle stream: ITL p50 {one['itl_p50']:.2f} ms vs in-process step {one['step_ms']:.2f} ms "
              f"({one['itl_p50'] / one['step_ms'] - 1:+.0%})")
        if 32 in by_level:
            print(f"32 streams: {by_level[32]['tokens_per_s'] / one['tokens_per_s']:.1f}x the single-stream rate, "
                  f"{by_level[32]['tokens_per_s'] / by_level[32]['limit']:.0%} of the in-process batch-32 limit")


if __name__ == "__main__":
    main()
