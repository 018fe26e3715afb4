"""Streaming generation benchmark: our own async gRPC load generator plus the in-process decode limit.

    python bench/generation_load.py [--url 127.0.0.1:8001] [--http-url http://127.0.0.1:8000]
        [--transport grpc|sse|both] [--levels 1 8 32 64] [--max-tokens 64] [--sse-client raw|httpx]
        [--grpc-connections one|per-user] [--workers 1]

Without --url it starts `ortserve serve` on the example repository itself (both ports). `--transport`
picks ortserve.v1.TextGeneration over gRPC (default), OpenAI streaming completions over server-sent
events (/v1/completions, `stream: true`), or both, each level run on one then the other
against the same server, with the SSE/gRPC ratios of tokens/s and TTFT p50. The SSE client is, by
default, a lean one (`--sse-client raw`: one asyncio connection per concurrent stream, the HTTP/1.1
request written by hand, the chunked body read whole, events split on a blank line and each event's
JSON parsed once with orjson), so its per-event cost is close to the gRPC client's C core;
`--sse-client httpx` is the earlier client (httpx, line-by-line parsing). Over SSE, a chunk's
tokens are its text's UTF-8 bytes (the byte-level decoder's tokens; the ITL gaps use them) and
the output total comes from `usage`. For each number of concurrent streams N, N clients each run
max(2, min(16, 128 // N)) streams back to back; it reports time to first token, inter-token latency
(per token), end-to-end latency (p50/p99) and output tokens/s. Right before and right after each level
it runs ONNX Runtime alone on batched decode steps of the same model (batch N, past length 64) in this
process, and reports their mean as that level's in-process limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.rpc.pb import text_generation_pb2 as gen_pb  # noqa: E402
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc  # noqa: E402

PROMPTS = ["def ", "import os\n", "class ", "    return ", "if __name__ == ", "for i in range(", "# ", "with open("]


async def one_stream(
    stub: gen_grpc.TextGenerationStub, index: int, max_tokens: int, model: str = "bytes_decoder",
    prompts: list[str] = PROMPTS,
) -> dict[str, object]:
    """One sampled stream over the typed API: its timings, the token ids it got and its prompt."""
    request = gen_pb.GenerateRequest(
        model=model, prompt=prompts[index % len(prompts)], max_tokens=max_tokens,
        temperature=0.8, top_k=40, seed=index, ignore_eos=True,
    )
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    ids: list[int] = []
    async for response in stub.Generate(request, timeout=600):
        arrivals.append((time.perf_counter(), len(response.token_ids)))
        ids.extend(response.token_ids)
    timings = _timings(start, arrivals, time.perf_counter(), len(ids))
    return {**timings, "ids": ids, "prompt": request.prompt}


def _timings(start: float, arrivals: list[tuple[float, int]], end: float, tokens: int) -> dict[str, object]:
    gaps = []
    for (previous, _), (now, count) in zip(arrivals[:-1], arrivals[1:], strict=True):
        gaps += [(now - previous) / max(count, 1)] * max(count, 1)
    return {"ttft": arrivals[0][0] - start, "gaps": gaps, "e2e": end - start, "tokens": tokens}


async def one_sse_stream(client: httpx.AsyncClient, index: int, max_tokens: int) -> dict[str, object]:
    body = _sse_body(index, max_tokens)
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            if event["choices"] and event["choices"][0]["text"]:
                arrivals.append((time.perf_counter(), len(event["choices"][0]["text"].encode())))
    return _timings(start, arrivals, time.perf_counter(), tokens)


def _sse_body(index: int, max_tokens: int) -> dict[str, object]:
    return {
        "model": "bytes_decoder", "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens,
        "temperature": 0.8, "top_k": 40, "seed": index, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }


class RawSseConnection:
    """One keep-alive HTTP/1.1 connection that runs streaming completions one after another.

    Why not httpx: under 32 streams on two shared cores, httpx's per-line iteration and json
    parsing in Python cost more than the server's work per event, so the benchmark measured the
    client. This reads each chunk of the chunked body whole, splits events on the blank line that
    ends them and parses each event's JSON once with orjson: about the per-message work the gRPC
    client's C core does.
    """

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    def _request(self, body: bytes) -> bytes:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def stream(self, index: int, max_tokens: int) -> dict[str, object]:
        reader, writer = await self._connect()
        start = time.perf_counter()
        writer.write(self._request(orjson.dumps(_sse_body(index, max_tokens))))
        headers = await reader.readuntil(b"\r\n\r\n")
        status = headers[9:12]
        if status != b"200":
            raise RuntimeError(f"SSE request answered {headers.decode(errors='replace')!r}")
        if b"transfer-encoding: chunked" not in headers.lower():
            raise RuntimeError(f"expected a chunked body, got headers {headers.decode(errors='replace')!r}")
        arrivals: list[tuple[float, int]] = []
        tokens = 0
        pending = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            now = time.perf_counter()
            pending += data[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                tokens = self._event(event, now, arrivals, tokens)
        if b"connection: close" in headers.lower():
            await self.close()
            self.reader = self.writer = None
        return _timings(start, arrivals, time.perf_counter(), tokens)

    @staticmethod
    def _event(event: bytes, now: float, arrivals: list[tuple[float, int]], tokens: int) -> int:
        """Records one `data: {...}` event's text bytes; returns the output total (from `usage` when present)."""
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return tokens
        payload = orjson.loads(event[6:])
        if payload.get("usage"):
            tokens = int(payload["usage"]["completion_tokens"])
        choices = payload["choices"]
        if choices and choices[0]["text"]:
            arrivals.append((now, len(choices[0]["text"].encode())))
        return tokens


async def level(target: str, streams: int, max_tokens: int, transport: str = "grpc",
                sse_client: str = "raw", grpc_connections: str = "one") -> dict[str, float]:
    """One level: `target` is the gRPC address (grpc) or the HTTP base URL (sse)."""
    # Each user runs streams back to back, so the batch stays full while streams come and
    # go: 16 each at low levels (one stream's ITL percentiles then rest on ~1,000 gaps),
    # fewer at high ones but at least 2, and about 128 streams in all. The ramps at the
    # start and end of a level (the batch filling, the last streams finishing alone) then
    # weigh less than they would over one round.
    rounds = max(2, min(16, 128 // streams))
    async with contextlib.AsyncExitStack() as stack:
        if transport == "sse" and sse_client == "raw":
            # One connection per concurrent stream (user), kept alive across its streams as httpx does.
            connections = [RawSseConnection(target) for _ in range(streams)]
            for connection in connections:
                stack.push_async_callback(connection.close)

            async def run(index: int) -> dict[str, object]:
                return await connections[index // rounds].stream(index, max_tokens)
        elif transport == "sse":
            limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=target, timeout=600, limits=limits))

            async def run(index: int) -> dict[str, object]:
                return await one_sse_stream(http, index, max_tokens)
        else:
            # One channel (one HTTP/2 connection: with --workers N every stream lands on the worker that
            # accepted it), or one per user, each its own TCP connection (a local subchannel pool, else
            # channels to one address share a connection), spread over the workers as SSE's connections are.
            count = streams if grpc_connections == "per-user" else 1
            options = [("grpc.use_local_subchannel_pool", 1)] if count > 1 else []
            stubs = [
                gen_grpc.TextGenerationStub(
                    await stack.enter_async_context(grpc.aio.insecure_channel(target, options=options)))
                for _ in range(count)
            ]

            async def run(index: int) -> dict[str, object]:
                return await one_stream(stubs[(index // rounds) % count], index, max_tokens)

        async def user(i: int) -> list[dict[str, object]]:
            return [await run(i * rounds + k) for k in range(rounds)]

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
            values = np.random.default_rng(i + 100).standard_normal(shape)
            feed[f"past_key_values.{i}.value"] = values.astype(np.float32)
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
    parser.add_argument("--url", help="gRPC address of a running server")
    parser.add_argument("--http-url", help="HTTP base URL of a running server (sse)")
    parser.add_argument("--transport", choices=["grpc", "sse", "both"], default="grpc")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sse-client", choices=["raw", "httpx"], default="raw",
                        help="SSE client: raw (lean asyncio + orjson) or httpx (line by line, the earlier figures)")
    parser.add_argument("--grpc-connections", choices=["one", "per-user"], default="one",
                        help="gRPC: one channel for all streams, or one TCP connection per concurrent stream")
    parser.add_argument("--workers", type=int, default=1, help="workers of the server this starts (without --url)")
    args = parser.parse_args()
    server = None
    address, http_url = args.url, args.http_url
    if address is None and http_url is None:
        port_file = ROOT / "bench" / "out" / "gen_port"
        port_file.parent.mkdir(exist_ok=True)
        port_file.unlink(missing_ok=True)
        server = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
             "--metrics-port", "0",
             "--workers", str(args.workers), "--port-file", str(port_file), "--log-level", "warning"], cwd=ROOT,
        )
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        http_url = f"http://127.0.0.1:{port_file.with_name(port_file.name + '.http').read_text()}"
    transports = ["grpc", "sse"] if args.transport == "both" else [args.transport]
    targets = {"grpc": address, "sse": http_url}
    missing = [t for t in transports if targets[t] is None]
    if missing:
        flags = " and ".join("--url" if t == "grpc" else "--http-url" for t in missing)
        parser.error(f"--transport {args.transport} needs {flags}")
    # The machine's speed drifts over minutes, so the in-process limit for each level is
    # measured right before and right after that level's load and averaged.
    decoder = InProcessDecoder()
    rows = []
    try:
        for n in args.levels:
            before = decoder.step(n)
            for transport in transports:
                r = asyncio.run(level(str(targets[transport]), n, args.max_tokens, transport, args.sse_client,
                                      args.grpc_connections))
                rows.append((n, transport, r))
                print(f"measured {n} streams over {transport}: {r['tokens_per_s']:.0f} tokens/s",
                      file=sys.stderr, flush=True)
            after = decoder.step(n)
            for row_n, _, r in rows:
                if row_n == n:
                    r["step_ms"] = (before[0] + after[0]) / 2
                    r["limit"] = (before[1] + after[1]) / 2
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    print("| streams | transport | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | e2e p50 ms | output tokens/s "
          "| in-process step ms (batch = streams, past 64) | in-process tokens/s | share of in-process |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, transport, r in rows:
        print(f"| {n} | {transport} | {r['ttft_p50']:.1f} | {r['ttft_p99']:.1f} | {r['itl_p50']:.2f} | "
              f"{r['itl_p99']:.2f} | {r['e2e_p50']:.0f} | {r['tokens_per_s']:.0f} | {r['step_ms']:.2f} | "
              f"{r['limit']:.0f} | {r['tokens_per_s'] / r['limit']:.0%} |")
    by_level = {(n, transport): r for n, transport, r in rows}
    for transport in transports:
        if (1, transport) in by_level:
            one = by_level[(1, transport)]
            print(f"\n{transport}, single stream: ITL p50 {one['itl_p50']:.2f} ms vs in-process step "
                  f"{one['step_ms']:.2f} ms ({one['itl_p50'] / one['step_ms'] - 1:+.0%})")
            if (32, transport) in by_level:
                many = by_level[(32, transport)]
                print(f"{transport}, 32 streams: {many['tokens_per_s'] / one['tokens_per_s']:.1f}x the single-stream "
                      f"rate, {many['tokens_per_s'] / many['limit']:.0%} of the in-process batch-32 limit")
    if len(transports) == 2:
        print()
        for n in args.levels:
            grpc_row, sse_row = by_level[(n, "grpc")], by_level[(n, "sse")]
            print(f"{n} streams, SSE vs gRPC: tokens/s {sse_row['tokens_per_s'] / grpc_row['tokens_per_s']:.0%}, "
                  f"TTFT p50 {sse_row['ttft_p50']:.1f} vs {grpc_row['ttft_p50']:.1f} ms "
                  f"({sse_row['ttft_p50'] / grpc_row['ttft_p50'] - 1:+.0%})")


if __name__ == "__main__":
    main()
