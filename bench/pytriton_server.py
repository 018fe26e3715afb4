"""Serve one ONNX model of the bench repository with NVIDIA Triton through PyTriton, for comparison with ortserve.

Run with bench/tools/pytriton-venv/bin/python (bench/setup_pytriton.sh makes it):

    bench/tools/pytriton-venv/bin/python bench/pytriton_server.py --model-dir bench/out/repo/mlp \
        --http-port 8010 --grpc-port 8011 --metrics-port 8012 [--ready-file PATH]

It binds `<model-dir>/1/model.onnx` under the directory's name (e.g. `mlp`) with a `@batch` inference function
that runs ONNX Runtime, prints `ready http=<port> grpc=<port>` (and writes the HTTP port to --ready-file) once
Triton reports the model ready, and serves until SIGTERM or SIGINT.

The same as ortserve serving that model with its defaults:
- the ONNX file, and so the graph and weights;
- max_batch_size, read from the directory's config.pbtxt (64 for bench/models.py's models);
- dynamic batching with no queue delay (ortserve's `dynamic_batching { }`; PyTriton's DynamicBatcher() default);
- one model instance (in ortserve, one per worker process);
- ONNX Runtime session options as ortserve's defaults for one instance: intra-op threads 0 (ONNX Runtime chooses),
  inter-op threads 0, sequential execution, graph optimisation "all", CPU memory arena on, intra- and inter-op
  spinning off, CPU execution provider; the ONNX Runtime release as the project's (the CPU wheel, not -gpu).

Not the same:
- Triton runs the model through its Python backend, not its ONNX Runtime backend (which ships only in Triton's
  containers, not as a wheel). Each request goes HTTP front end -> Triton's dynamic batcher -> Python backend stub
  process (shared-memory IPC with tritonserver) -> PyTriton's proxy (ZeroMQ plus shared memory) -> this process,
  where @batch concatenates the requests, ONNX Runtime runs, and the outputs travel back the same way. So this
  measures Triton's C++ HTTP front end and batcher plus two Python IPC hops, more per batch than ortserve, which
  runs ONNX Runtime in the serving process.
- One Triton process with one instance; ortserve's benchmark runs --workers 2 (two processes, each with its own
  front ends, batcher and session). ONNX Runtime's default thread count applies to each session.
- PyTriton writes preferred_batch_size [max_batch_size] into the config; with no queue delay Triton does not
  wait for it and runs whatever is queued, as ortserve does.
- Triton's HTTP front end has its own thread pool (Triton's default thread count); ortserve's is an asyncio loop.
- PyTriton's access token on Triton's admin endpoints is off (restricted_endpoints=[]), so perf_analyzer may read
  statistics as it does from ortserve; both servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sysconfig
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

_NUMPY_OF_ONNX = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def match_libpython() -> None:
    """Let Triton's Python backend stub load this interpreter's libpython, not the system's.

    The stub (nvidia-pytriton's python_backend_stubs/3.X) links libpython3.X.so.1.0 by name and imports the
    standard library of the venv's base interpreter. Where that interpreter is not the system's (pyenv here:
    3.11.7 beside Debian's 3.11.2), the loader finds the system libpython, and the 3.11.7 standard library on the
    3.11.2 core fails at model load (`'_thread.RLock' object has no attribute '_recursion_count'`). tritonserver
    and the stub inherit this process's environment (PyTriton appends its own libraries after ours).
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        current = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def max_batch_size(model_dir: Path) -> int:
    """max_batch_size from the directory's config.pbtxt (the one ortserve reads)."""
    match = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", (model_dir / "config.pbtxt").read_text(), re.MULTILINE)
    if not match:
        raise SystemExit(f"no max_batch_size in {model_dir / 'config.pbtxt'}")
    return int(match.group(1))


def session(model_path: Path) -> ort.InferenceSession:
    """An ONNX Runtime session with ortserve's default options for a single instance on the CPU."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 0
    so.inter_op_num_threads = 0
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = True
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model_path.read_bytes(), sess_options=so, providers=["CPUExecutionProvider"])


def tensors(args: list[ort.NodeArg]) -> list[Tensor]:
    """PyTriton tensor specs without the batch dimension."""
    return [Tensor(name=a.name, dtype=_NUMPY_OF_ONNX[a.type], shape=tuple(int(d) for d in a.shape[1:])) for a in args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="<repo>/<model> with config.pbtxt, 1/model.onnx")
    parser.add_argument("--http-port", type=int, default=8010)
    parser.add_argument("--grpc-port", type=int, default=8011)
    parser.add_argument("--metrics-port", type=int, default=8012)
    parser.add_argument("--ready-file", type=Path, help="written with the HTTP port once the model is ready")
    parser.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="Triton's dynamic batcher max_queue_delay_microseconds (default 0, as ortserve's)")
    args = parser.parse_args()

    match_libpython()
    name = args.model_dir.name
    sess = session(args.model_dir / "1" / "model.onnx")
    output_names = [o.name for o in sess.get_outputs()]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, sess.run(output_names, inputs), strict=True))

    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.http_port,
        grpc_address="127.0.0.1", grpc_port=args.grpc_port,
        metrics_address="127.0.0.1", metrics_port=args.metrics_port,
        allow_gpu_metrics=False, log_verbose=0,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,  # one callable: one model instance
            inputs=tensors(sess.get_inputs()),
            outputs=tensors(sess.get_outputs()),
            config=ModelConfig(
                max_batch_size=max_batch_size(args.model_dir),
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        triton.run()  # returns once the server and the model are ready
        if args.ready_file:
            args.ready_file.write_text(str(args.http_port))
        print(f"ready http={args.http_port} grpc={args.grpc_port} model={name}", flush=True)
        while not stop.wait(1.0):
            if not triton.is_alive():
                raise SystemExit("tritonserver or the model proxy exited")


if __name__ == "__main__":
    main()
