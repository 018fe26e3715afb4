"""bench/stack_classes.py: the rules that charge a sampled stack to a request stage (issue 15's breakdown).

The table names our functions; if one is renamed or moved, the breakdown would silently charge its
samples elsewhere, so every name in the table must still exist in the source.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stack_classes", ROOT / "bench" / "stack_classes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stack_classes"] = module
    spec.loader.exec_module(module)
    return module


def _line_of(path: str, needle: str) -> int:
    for number, line in enumerate((ROOT / path).read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


LOOP_ROOT = [
    "<module> (server/__main__.py:139)",
    "run (uvloop/__init__.py:92)",
    "Runner.run (asyncio/runners.py:118)",
]


def test_every_function_named_in_the_tables_exists(sc: ModuleType) -> None:
    for path, table in sc._OURS.items():
        assert (ROOT / path).exists(), path
        defined = {node.name for node in ast.walk(ast.parse((ROOT / path).read_text()))
                   if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        for function in table:
            if function is not None:
                assert function in defined, f"{path}: {function} (update bench/stack_classes.py)"
    for qualified in list(sc._QUALIFIED) + list(sc._LINE_HINTS):
        cls, _, method = qualified.partition(".")
        assert any(f"def {method}(" in (ROOT / p).read_text() and f"class {cls}" in (ROOT / p).read_text()
                   for p in sc._OURS), qualified


def test_our_innermost_frame_decides(sc: ModuleType) -> None:
    line = _line_of("server/rpc/servicers.py", "infer_request_from_pb")
    servicer = f"InferenceServicer.ModelInfer (server/rpc/servicers.py:{line})"
    decode = "decode_raw (server/core/bytes_codec.py:113)"
    # numpy called from our decoder counts for the decoder.
    assert sc.classify([*LOOP_ROOT, servicer, "infer_request_from_pb (server/rpc/converters.py:78)", decode,
                        "reshape (numpy/core/fromnumeric.py:285)"]) == sc.CONVERT
    assert sc.classify([*LOOP_ROOT, servicer, "infer_response_to_pb (server/rpc/converters.py:105)"]) == sc.RESPONSE
    assert sc.classify([*LOOP_ROOT, "deserialize (server/rpc/registration.py:56)"]) == sc.RECEIVE
    assert sc.classify([*LOOP_ROOT, servicer, "Model.infer (server/core/model.py:200)",
                        "SignatureValidator.validate (server/core/model.py:94)"]) == sc.VALIDATE


def test_one_function_split_by_the_sampled_line(sc: ModuleType) -> None:
    batcher, instance = "server/core/batcher.py", "server/core/instance.py"
    merge = _line_of(batcher, "else np.concatenate")
    merged = f"Scheduler._merged ({batcher}:{merge})"
    assert sc.classify([*LOOP_ROOT, "Scheduler._dispatch (server/core/batcher.py:340)", merged]) == sc.MERGE
    submit = _line_of(batcher, "thread.submit(loop")
    assert sc.classify([*LOOP_ROOT, f"Scheduler._start ({batcher}:{submit})",
                        f"InstanceThread.submit ({instance}:30)"]) == sc.HANDOFF
    # A batch run on the loop: its merge, its run and its answers, told apart by the line.
    on_loop = f"Scheduler._run_on_loop ({batcher}:{_line_of(batcher, 'results, infer_ns = run_instance(')})"
    assert sc.classify([*LOOP_ROOT, on_loop]) == sc.HANDOFF
    assert sc.classify([*LOOP_ROOT, on_loop, "run_instance (server/core/instance.py:66)",
                        "OnnxRuntimeSession.run (server/runtime/onnx.py:151)"]) == sc.ORT
    model = "server/core/model.py"
    respond = _line_of(model, "outputs=[self._build_output")
    assert sc.classify([*LOOP_ROOT, f"Model.infer ({model}:{respond})"]) == sc.RESPONSE


def test_native_and_thread_rules(sc: ModuleType) -> None:
    # The loop's root as the sampled frame: native work with no Python frame of its own.
    assert sc.classify(LOOP_ROOT) == sc.NATIVE_LOOP
    # grpc.aio's server loop waits over its per-method futures.
    assert sc.classify([*LOOP_ROOT, "wait (asyncio/tasks.py:415)"]) == sc.GRPC_LOOP
    instance = "server/core/instance.py"
    running = _line_of(instance, "results, infer_ns = run_instance(")
    model_thread = ["Thread._bootstrap (threading.py:1002)", f"InstanceThread._loop ({instance}:{running})"]
    assert sc.classify([*model_thread, "run_instance (server/core/instance.py:66)",
                        "OnnxRuntimeSession.run (server/runtime/onnx.py:151)",
                        "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:395)"]) == sc.ORT
    assert sc.classify(model_thread) == sc.HANDOFF
    # Sampled on its blocking get: woken or parked, not computing.
    waiting = _line_of(instance, "self._jobs.get()")
    assert sc.classify([model_thread[0], f"InstanceThread._loop ({instance}:{waiting})"]) == sc.WAITING
    # --native stacks: waits are left out; a wake-up write is a hand-off, not a send.
    assert sc.classify([*model_thread, "pthread_cond_timedwait (libc.so.6)"]) == sc.WAITING
    assert sc.classify([*model_thread, "call_soon_threadsafe (loop.c:1)", "uv_async_send (async.c:1)",
                        "write (libc.so.6)"]) == sc.HANDOFF
    grpc_frame = "0x7f00 (grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so)"
    assert sc.classify([*LOOP_ROOT, grpc_frame, "sendmsg (libc.so.6)"]) == sc.SEND
    assert sc.classify(["0x7f01 (libc.so.6)", grpc_frame]) == sc.GRPC_CORE
    assert sc.thread_kind("event_engine", "") == sc.GRPC_CORE
    assert sc.thread_kind("python", "") == sc.ORT  # no Python state: ONNX Runtime's pool
    assert sc.thread_kind("python", "ort-mlp-0") is None  # its own samples decide


def test_raw_lines_with_process_and_thread(sc: ModuleType) -> None:
    lines = [
        'process 10:"python -m server";thread (11): MainThread;' + ";".join(LOOP_ROOT) + " 7",
        'process 10:"python -m server";thread (12): ort-mlp-0;Thread._bootstrap (threading.py:1002);'
        "InstanceThread._loop (server/core/instance.py:0) 3",
    ]
    stacks = sc.read_raw(lines)
    assert sum(stacks.values()) == 10
    threads = sc.breakdown_by_thread(stacks)
    assert threads[(10, 11)] == ("MainThread", {sc.NATIVE_LOOP: 7})
    assert threads[(10, 12)] == ("ort-mlp-0", {sc.HANDOFF: 3})
