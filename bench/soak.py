"""Soak test: minutes of mixed load against one server, reporting failures by status and memory over time.

    python bench/soak.py [--minutes 10] [--workers 2] [--url HOST:PORT] [--json OUT]

Without --url it starts `ortserve serve` on the example repository (explicit control mode, every model
loaded) and samples the resident memory of the whole process tree (supervisor and workers). The load,
all at once, for the whole run:

- tensor clients: `digits` and the `digits_pipeline` ensemble, batch 1-4, answers checked for shape;
- generation clients: `bytes_decoder` streams of 8-64 tokens on ortserve.v1.TextGeneration, one in four
  cancelled by the client after a few tokens, others through Triton's ModelStreamInfer convention;
- a control client: every 15 s a reload (RepositoryModelLoad of a loaded model), alternating `digits`
  and `bytes_decoder`, while the other clients keep going (admitted work must finish on its version);
- HTTP clients: KServe v2 REST infer (JSON) on `digits`, and OpenAI streaming completions on `bytes_decoder`,
  one in four abandoned by the client after a few events;
- a hostile client: malformed requests of many kinds (unknown models, bad shapes and datatypes, wrong byte
  counts, garbage bodies, bad sampling parameters), which must get a proper client-error status.

It prints one line every 30 s and a summary, and exits 1 when a good request failed, any request got
UNKNOWN or INTERNAL, or memory grew by more than 10% (and 50 MiB) from the end of warm-up (the first
minute) to the end.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.rpc.pb import grpc_service_pb2 as pb  # noqa: E402
from server.rpc.pb import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from server.rpc.pb import text_generation_pb2 as gen_pb  # noqa: E402
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc  # noqa: E402

PROMPTS = ["def ", "import os\n", "class ", "    return ", "for i in range(", "# ", "with open("]
WARM_UP_S = 60.0
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE,
}


class Tally:
    """Outcomes by (kind, status), shared by every client thread."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def add(self, kind: str, status: str, detail: str = "") -> None:
        with self._lock:
            self.counts[(kind, status)] += 1
            if detail and (kind, status) not in self.examples:
                self.examples[(kind, status)] = detail[:300]

    def bad(self) -> dict[str, int]:
        """Failures that fail the soak: good requests not OK, anything UNKNOWN or INTERNAL."""
        out = {}
        for (kind, status), count in self.counts.items():
            good = ("tensor", "pipeline", "generate", "stream_infer", "reload", "http_infer", "http_openai", "http")
            good_failed = kind in good and status not in ("OK", "CANCELLED_BY_CLIENT")
            if good_failed or status in ("UNKNOWN", "INTERNAL"):
                out[f"{kind}:{status}"] = count
        return out


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def digits_request(model: str, rows: int, rng: random.Random) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    if model == "digits":
        data = np.array([rng.random() * 16 for _ in range(rows * 64)], np.float32).reshape(rows, 1, 8, 8)
        request.inputs.add(name="image", datatype="FP32", shape=list(data.shape))
    else:
        data = np.array([rng.randrange(256) for _ in range(rows * 64)], np.uint8).reshape(rows, 8, 8)
        request.inputs.add(name="pixels", datatype="UINT8", shape=list(data.shape))
    request.raw_input_contents.append(data.tobytes())
    return request


def tensor_client(address: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            model = "digits" if rng.random() < 0.7 else "digits_pipeline"
            kind = "tensor" if model == "digits" else "pipeline"
            rows = rng.randint(1, 4)
            try:
                response = stub.ModelInfer(digits_request(model, rows, rng), timeout=60)
                ok = response.outputs and response.outputs[0].shape[0] == rows
                tally.add(kind, "OK" if ok else "WRONG_ANSWER", str(response.outputs[:1]))
            except grpc.RpcError as exc:
                tally.add(kind, exc.code().name, exc.details() or "")


def generate_client(address: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(address) as channel:
        stub = gen_grpc.TextGenerationStub(channel)
        while not stop.is_set():
            max_tokens = rng.randint(8, 64)
            request = gen_pb.GenerateRequest(
                model="bytes_decoder", prompt=rng.choice(PROMPTS), max_tokens=max_tokens,
                temperature=0.8, top_k=40, seed=rng.randrange(2**32), ignore_eos=True,
            )
            cancel_after = rng.randint(1, 4) if rng.random() < 0.25 else None
            call = stub.Generate(request, timeout=120)
            tokens = 0
            try:
                for response in call:
                    tokens += len(response.token_ids)
                    if cancel_after is not None and tokens >= cancel_after:
                        call.cancel()
                        break
                    if response.finish_reason and response.completion_tokens != max_tokens:
                        tally.add("generate", "WRONG_ANSWER", f"{response.completion_tokens} tokens of {max_tokens}")
                        break
                else:
                    tally.add("generate", "OK")
                    continue
                if cancel_after is not None:
                    tally.add("generate", "CANCELLED_BY_CLIENT")
            except grpc.RpcError as exc:
                if cancel_after is not None and exc.code() == grpc.StatusCode.CANCELLED:
                    tally.add("generate", "CANCELLED_BY_CLIENT")
                else:
                    tally.add("generate", exc.code().name, exc.details() or "")


def stream_infer_client(address: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Triton's decoupled convention: text_input/max_tokens/stream on ModelStreamInfer."""
    rng = random.Random(seed)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            request = pb.ModelInferRequest(model_name="bytes_decoder", id=str(rng.randrange(10**9)))
            prompt = rng.choice(PROMPTS).encode()
            text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
            text.contents.bytes_contents.append(prompt)
            tokens = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
            tokens.contents.int_contents.append(rng.randint(4, 32))
            stream = request.inputs.add(name="stream", datatype="BOOL", shape=[1])
            stream.contents.bool_contents.append(True)
            try:
                answers = stub.ModelStreamInfer(iter([request]), timeout=120)
                errors = [r.error_message for r in answers if r.error_message]
                tally.add("stream_infer", "OK" if not errors else "STREAM_ERROR", "; ".join(errors))
            except grpc.RpcError as exc:
                tally.add("stream_infer", exc.code().name, exc.details() or "")


def http_client(http_url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """KServe v2 REST infer (JSON) on `digits` and OpenAI streaming completions, some abandoned mid-stream."""
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=http_url, timeout=120) as client:
        while not stop.is_set():
            try:
                if rng.random() < 0.5:
                    rows = rng.randint(1, 4)
                    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [rows, 1, 8, 8],
                                        "data": [rng.random() * 16 for _ in range(rows * 64)]}]}
                    reply = client.post("/v2/models/digits/infer", json=body)
                    ok = reply.status_code == 200 and reply.json()["outputs"][0]["shape"][0] == rows
                    tally.add("http_infer", "OK" if ok else f"HTTP_{reply.status_code}", reply.text[:200])
                    continue
                max_tokens = rng.randint(4, 32)
                leave_after = rng.randint(1, 3) if rng.random() < 0.25 else None
                body = {"model": "bytes_decoder", "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens,
                        "stream": True, "temperature": 0.8, "seed": rng.randrange(2**31)}
                events = 0
                with client.stream("POST", "/v1/completions", json=body) as reply:
                    if reply.status_code != 200:
                        tally.add("http_openai", f"HTTP_{reply.status_code}", reply.read().decode()[:200])
                        continue
                    for line in reply.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            events += 1
                            if leave_after is not None and events >= leave_after:
                                break
                tally.add("http_openai", "CANCELLED_BY_CLIENT" if leave_after is not None else "OK")
            except httpx.HTTPError as exc:
                tally.add("http", "TRANSPORT_ERROR", repr(exc))


def control_client(address: str, stop: threading.Event, tally: Tally, period_s: float) -> None:
    models = ["digits", "bytes_decoder"]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        turn = 0
        while not stop.wait(period_s):
            name = models[turn % len(models)]
            turn += 1
            try:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=300)
                tally.add("reload", "OK")
            except grpc.RpcError as exc:
                tally.add("reload", exc.code().name, exc.details() or "")


def hostile_requests(rng: random.Random) -> list[tuple[str, object]]:
    """(method, request or raw bytes) pairs that a server must refuse cleanly."""
    out: list[tuple[str, object]] = []
    unknown = pb.ModelInferRequest(model_name="no_such_model_" + "x" * rng.randint(1, 5000))
    out.append(("ModelInfer", unknown))
    shape = pb.ModelInferRequest(model_name="digits")
    shape.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, rng.randint(9, 99)])
    shape.raw_input_contents.append(bytes(4 * 64))
    out.append(("ModelInfer", shape))
    dtype = pb.ModelInferRequest(model_name="digits")
    dtype.inputs.add(name="image", datatype=rng.choice(["INT8", "FP16", "BYTES", "NOPE", ""]), shape=[1, 1, 8, 8])
    dtype.raw_input_contents.append(bytes(rng.randint(0, 300)))
    out.append(("ModelInfer", dtype))
    claimed = pb.ModelInferRequest(model_name="digits")
    claimed.inputs.add(name="image", datatype="BYTES", shape=[1, 1 << rng.randint(20, 60)])
    claimed.raw_input_contents.append(bytes(rng.randint(0, 8)))
    out.append(("ModelInfer", claimed))
    odd_version = rng.choice(["²", "١", "-1", "1e3", "99999999999999999999"])
    version = pb.ModelInferRequest(model_name="digits", model_version=odd_version)
    out.append(("ModelInfer", version))
    sampling = pb.ModelInferRequest(model_name="bytes_decoder")
    text = sampling.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"def ")
    params = sampling.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    params.contents.bytes_contents.append(rng.choice([
        b'{"temperature": NaN}', b'{"top_k": 1e30}', b'{"max_tokens": 1e400}', b"[" * 10000 + b"]" * 10000,
        b'{"repetition_penalty": -1}', b"not json", b'{"stop": ' + json.dumps(["ab"] * 5000).encode() + b"}",
    ]))
    out.append(("ModelInfer", sampling))
    out.append(("ModelInfer", bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))))
    out.append(("ModelMetadata", bytes(rng.randrange(256) for _ in range(rng.randint(1, 50)))))
    return out


def hostile_client(address: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(address) as channel:
        raw = {
            method: channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            for method in ("ModelInfer", "ModelMetadata")
        }
        while not stop.is_set():
            for method, request in hostile_requests(rng):
                body = request if isinstance(request, bytes) else request.SerializeToString()
                try:
                    raw[method](body, timeout=60)
                    tally.add("hostile", "OK_UNEXPECTED", method)
                except grpc.RpcError as exc:
                    code = exc.code()
                    status = code.name if code not in CLIENT_ERRORS else "REFUSED"
                    tally.add("hostile", status, f"{method}: {exc.details()}")


def start_server(workers: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port_file = workdir / "port"
    log = open(workdir / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model-repository", str(ROOT / "model_repository"),
         "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file),
         "--workers", str(workers),
         "--model-control-mode", "explicit", "--load-model", "*"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not (port_file.exists() and port_file.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start; log in {workdir / 'server.log'}")
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    http_file = port_file.with_name(port_file.name + ".http")
    while not (http_file.exists() and http_file.read_text()):
        time.sleep(0.1)
    http_url = f"http://127.0.0.1:{http_file.read_text().strip()}"
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while not stub.ServerReady(pb.ServerReadyRequest(), timeout=60).ready:
            time.sleep(0.2)
    return process, address, http_url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--url", help="an already running server's gRPC address (memory is then not sampled)")
    parser.add_argument("--http-url", help="with --url: its HTTP address (http://host:port); without, no HTTP load")
    parser.add_argument("--tensor-clients", type=int, default=3)
    parser.add_argument("--generate-clients", type=int, default=3)
    parser.add_argument("--reload-period-s", type=float, default=15.0)
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ortserve-soak-"))
    process = None
    if args.url:
        address, http_url = args.url, args.http_url
    else:
        process, address, http_url = start_server(args.workers, workdir)
        print(f"server pid {process.pid} on {address}; log {workdir / 'server.log'}", flush=True)

    tally, stop = Tally(), threading.Event()
    clients = [
        threading.Thread(target=tensor_client, args=(address, stop, tally, i)) for i in range(args.tensor_clients)
    ]
    clients += [
        threading.Thread(target=generate_client, args=(address, stop, tally, 100 + i))
        for i in range(args.generate_clients)
    ]
    clients += [threading.Thread(target=stream_infer_client, args=(address, stop, tally, 200))]
    clients += [threading.Thread(target=control_client, args=(address, stop, tally, args.reload_period_s))]
    clients += [threading.Thread(target=hostile_client, args=(address, stop, tally, 300))]
    if http_url:
        clients += [threading.Thread(target=http_client, args=(http_url, stop, tally, 400 + i)) for i in range(2)]
    for client in clients:
        client.start()

    start = time.monotonic()
    memory: list[tuple[float, int]] = []
    try:
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            time.sleep(min(10.0, args.minutes * 60 - elapsed))
            elapsed = time.monotonic() - start
            if process is not None:
                if process.poll() is not None:
                    tally.add("server", "DIED")
                    break
                memory.append((round(elapsed, 1), tree_rss_kib(process.pid)))
            if len(memory) % 3 == 0:
                total = sum(tally.counts.values())
                rss = f", RSS {memory[-1][1] / 1024:.0f} MiB" if memory else ""
                print(f"{elapsed:6.0f} s: {total} requests, failures {tally.bad() or 'none'}{rss}", flush=True)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=180)
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=60)

    after_warm_up = [kib for t, kib in memory if t >= WARM_UP_S]
    growth_kib = after_warm_up[-1] - after_warm_up[0] if len(after_warm_up) >= 2 else 0
    memory_ok = not after_warm_up or growth_kib <= max(0.10 * after_warm_up[0], 50 * 1024)
    summary = {
        "minutes": args.minutes,
        "workers": args.workers,
        "outcomes": {f"{k}:{s}": n for (k, s), n in sorted(tally.counts.items())},
        "failures": tally.bad(),
        "examples": {f"{k}:{s}": d for (k, s), d in sorted(tally.examples.items()) if s not in ("OK",)},
        "rss_mib": [(t, round(kib / 1024, 1)) for t, kib in memory],
        "rss_growth_after_warm_up_mib": round(growth_kib / 1024, 1),
        "exit_code": process.returncode if process is not None else None,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    ok = not tally.bad() and memory_ok and (process is None or process.returncode == 0)
    print("SOAK PASSED" if ok else "SOAK FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
