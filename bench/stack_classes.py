"""Sorts py-spy stacks of an ortserve worker into the stages of a request (issue 15's CPU breakdown).

py-spy (`record --format raw --threads --subprocesses`) writes one line per distinct stack: the
process and thread (`thread (TID): NAME`), then the frames from the thread's root to the sampled
frame, joined by ';', then a space and the number of samples. A frame reads `function (file:line)`;
with `--native` also `function (library.so)` for exported native symbols and `0xADDRESS
(library.so)` for the rest (grpcio's extension, which holds gRPC's C core, is stripped).

bench/profile_breakdown.py samples Python frames only, without stopping the process
(`--nonblocking`): in bench/pyspy_bias_check.py, `--native` (which must stop the process to
unwind it) charged a loop of cheap syscalls 72-81% of the samples where they took 32% of the
time, and `--nonblocking` 30-31%; so native stacks are only the optional `--native` view.
Native work then counts for the innermost Python frame that called it. The rules, applied to
each stack from the sampled frame outwards; the first frame that decides wins:

1. A blocking call (a condition, semaphore or futex wait, epoll_wait, poll, select, sleep, the
   GIL's take_gil; native stacks only), or the model thread's blocking `get` of its next batch,
   decides WAITING: the thread was parked, or woken and waiting for a CPU (py-spy counts a runnable
   thread as busy; on a loaded machine such samples pile up where threads wake). These samples
   are counted but left out of the CPU shares.
2. A socket syscall (native stacks only) decides by direction: sendmsg/send/writev/write SEND,
   recvmsg/recv/read RECEIVE; except writes that only wake a thread (uvloop's async handle:
   HANDOFF; C-core's eventfd, the wake-up byte grpc.aio's poller sends the loop: gRPC).
3. Our code (`server/...`) decides by file and function (the tables below; where one function does
   several stages, the text of the sampled line decides): this is the "innermost frame of ours"
   rule, so numpy, protobuf or native frames called from our code count for the stage of our code
   that called them. Files not in the table (the start-up frames at the root of the loop's
   stacks) are neutral.
4. ONNX Runtime (any frame in onnxruntime's Python package or its extension) decides ORT.
5. gRPC: grpc's Python package, or (native) its Cython/C-core extension, decides GRPC_LOOP on a
   thread that runs Python (the event loop's: call setup, the completion queue, batch
   operations), GRPC_CORE on a thread that does not (C-core's own threads). A protobuf frame
   inside the extension is the response serializer it calls itself: RESPONSE.
6. Queue hand-offs (SimpleQueue put/get) and asyncio's call_soon_threadsafe / set_result
   decide HANDOFF.
7. Everything else (uvloop, asyncio, libpython, numpy, protobuf, libc internals, threading.py)
   is neutral and the search goes on outwards, with two fallbacks when nothing outwards decides:
   asyncio.wait's frames are grpc.aio's server loop waiting over its per-method futures (our
   request path never calls asyncio.wait): GRPC_LOOP; and a stack whose sampled frame is the
   loop's own root (`uvloop.run`, `Runner.run`) is native code the event loop runs with no
   Python frame of its own: uvloop itself, gRPC's Cython and C core, the response's
   SerializeToString and the send: NATIVE_LOOP. Other stacks through uvloop or asyncio are
   LOOP (the loop's own Python-visible work), the rest OTHER.

Threads without Python frames never appear in Python-only samples: bench/profile_breakdown.py
charges their CPU (from /proc) by thread name (gRPC's `event_engine`, `grpc_global_tim`,
`lifeguard`: GRPC_CORE; unnamed native threads, which are ONNX Runtime's intra-op pool: ORT),
and grpc.aio's poller thread (`_poll_wrapper`, Python with only native work below) to GRPC_CORE.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECEIVE = "gRPC receive and parse"
CONVERT = "conversion to arrays"
VALIDATE = "validation"
QUEUE = "queueing (data plane, scheduler)"
HANDOFF = "hand-off to the model thread and back"
MERGE = "merging (np.concatenate)"
ORT = "ONNX Runtime run"
SPLIT = "splitting"
RESPONSE = "response building (incl. SerializeToString)"
SEND = "send (sendmsg/writev)"
GRPC_LOOP = "gRPC aio on the loop thread (Python-visible, or native with --native)"
GRPC_CORE = "gRPC C-core threads and grpc.aio's poller thread"
NATIVE_LOOP = "native code under the loop (uvloop, gRPC Cython/C-core, SerializeToString, send)"
LOOP = "event loop itself (Python-visible: asyncio callbacks, futures)"
BOOKKEEPING = "call wrappers, statistics, request ids"
OTHER = "other"
WAITING = "parked in a wait (not CPU; left out)"

# The order of the table's rows.
CATEGORIES = (
    RECEIVE, CONVERT, VALIDATE, QUEUE, HANDOFF, MERGE, ORT, SPLIT, RESPONSE, SEND,
    GRPC_LOOP, NATIVE_LOOP, GRPC_CORE, LOOP, BOOKKEEPING, OTHER,
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<where>[^()]*)\)$")
_WAITS = frozenset({
    "pthread_cond_wait", "pthread_cond_timedwait", "pthread_cond_clockwait", "sem_wait", "sem_timedwait",
    "sem_clockwait", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect",
    "nanosleep", "clock_nanosleep", "usleep", "take_gil", "futex", "syscall", "PyThread_acquire_lock_timed",
    "__futex_abstimed_wait_common", "do_futex_wait",
})
_SENDS = frozenset({"sendmsg", "send", "sendto", "writev", "write", "__libc_sendmsg", "__libc_write"})
_RECEIVES = frozenset({"recvmsg", "recv", "recvfrom", "readv", "read", "__libc_recvmsg", "__libc_read"})

# Our files and functions -> stage. A function not listed takes its file's default (the None key).
_OURS: dict[str, dict[str | None, str]] = {
    "server/rpc/registration.py": {None: BOOKKEEPING, "deserialize": RECEIVE},
    "server/rpc/status.py": {None: BOOKKEEPING, "check_parsed": RECEIVE},
    "server/rpc/servicers.py": {None: BOOKKEEPING},
    "server/rpc/auth.py": {None: BOOKKEEPING},
    "server/rpc/converters.py": {None: CONVERT, "infer_response_to_pb": RESPONSE, "params_to_pb": RESPONSE},
    "server/rpc/tensor_codec.py": {None: CONVERT},
    "server/core/bytes_codec.py": {None: CONVERT, "encode_raw": RESPONSE, "encode_bytes": RESPONSE},
    "server/core/model.py": {
        None: VALIDATE, "_build_output": RESPONSE, "wire_output": RESPONSE, "classify": RESPONSE,
        "infer": VALIDATE,
    },
    "server/core/types.py": {None: CONVERT},
    "server/core/batcher.py": {
        None: QUEUE, "_start": MERGE, "_merged": MERGE, "_finish_batch": SPLIT, "done": HANDOFF, "submit": QUEUE,
        "_run_on_loop": MERGE,
    },
    "server/core/instance.py": {None: HANDOFF, "stop": OTHER},
    "server/core/statistics.py": {None: BOOKKEEPING},
    "server/core/errors.py": {None: BOOKKEEPING},
    "server/runtime/onnx.py": {None: ORT},
    "server/service/dataplane.py": {None: QUEUE},
    "server/service/metrics.py": {None: BOOKKEEPING},
    "server/service/statistics.py": {None: BOOKKEEPING},
    "server/repository/registry.py": {None: QUEUE},
    "server/logs.py": {None: BOOKKEEPING},
}
# InstanceThread.submit is the hand-off; Scheduler.submit is queueing: told apart by the qualified name.
_QUALIFIED = {"InstanceThread.submit": HANDOFF, "Scheduler.submit": QUEUE}
# Functions that do several stages: the sampled line's source text decides (first substring found).
_LINE_HINTS: dict[str, tuple[tuple[str, str], ...]] = {
    "Model.infer": (
        ("InferResponse", RESPONSE), ("_build_output", RESPONSE), ("outputs=", RESPONSE), ("submit", QUEUE),
        ("record_request", BOOKKEEPING), ("perf_counter", BOOKKEEPING), ("failure", BOOKKEEPING),
    ),
    "Scheduler._start": (("_merged", MERGE), ("submit", HANDOFF), ("def done", HANDOFF)),
    "Scheduler._merged": (("concatenate", MERGE), ("queue_wait", BOOKKEEPING)),
    "Scheduler._run_on_loop": (("_merged", MERGE), ("_finish_batch", SPLIT), ("run_instance", HANDOFF)),
    # Sampled on its blocking get: woken and waiting for a CPU (py-spy counts a runnable thread as
    # busy), or parked; the wake-up's own CPU is small beside the wait on a busy machine.
    "InstanceThread._loop": (("self._jobs.get()", WAITING),),
    "Scheduler._finish_batch": (
        ("set_result", HANDOFF), ("set_exception", HANDOFF), ("done()", HANDOFF),
        ("record_execution", BOOKKEEPING), ("_dispatch", QUEUE), ("_idle.append", QUEUE),
    ),
}
_SOURCE_CACHE: dict[str, list[str]] = {}


def _source_line(path: str, line: str) -> str:
    """The text of a line of one of our files (empty if unreadable), read from this checkout."""
    if path not in _SOURCE_CACHE:
        try:
            _SOURCE_CACHE[path] = (ROOT / path).read_text().splitlines()
        except OSError:
            _SOURCE_CACHE[path] = []
    lines = _SOURCE_CACHE[path]
    index = int(line) - 1 if line.isdigit() else -1
    return lines[index] if 0 <= index < len(lines) else ""


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, where) of one frame; where is `file:line`, a library name or empty."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match.group("func"), match.group("where")


def _ours(func: str, where: str) -> str | None:
    path, _, line = where.rpartition(":")
    marker = path.find("server/")
    if not path or marker < 0 or (marker > 0 and path[marker - 1] != "/"):
        return None
    path = path[marker:]
    table = _OURS.get(path)
    if table is None:
        return None  # start-up frames (server/__main__.py, app.py) are at the root of every loop-thread stack
    if func in _QUALIFIED:
        return _QUALIFIED[func]
    # Comprehensions count for the function they are written in.
    func = re.sub(r"(\.<locals>)?\.<(listcomp|genexpr|dictcomp|setcomp|lambda)>$", "", func)
    for needle, stage in _LINE_HINTS.get(func, ()):
        if needle in _source_line(path, line):
            return stage
    return table.get(func.rsplit(".", 1)[-1], table[None])


def _is_grpc(func: str, where: str) -> bool:
    return "cygrpc" in where or where.startswith("grpc/") or "/grpc/" in where


def _is_protobuf(where: str) -> bool:
    return "_upb" in where or "google/protobuf" in where or "_message." in where


def _is_loop(func: str, where: str) -> bool:
    return (
        "_asynciomodule.c" in where or "uvloop" in where or where.startswith("asyncio/")
        or where.startswith(("loop.c", "uv", "core.c", "linux.c", "loop-watcher.c", "async.c", "queue.h"))
        or func.startswith(("uv_", "uv__"))
    )


_LOOP_ROOTS = {("run", "uvloop/__init__.py"), ("Runner.run", "asyncio/runners.py"), ("run", "asyncio/runners.py")}
_GRPC_WAITS = {"wait", "_wait", "_on_completion", "_release_waiter"}


def classify(frames: list[str]) -> str:
    """The stage one stack (frames from the root outwards to the sampled one) is charged to."""
    parsed = [parse_frame(frame) for frame in frames if not frame.startswith(("process ", "thread ("))]
    if not parsed:
        return OTHER
    names = {func for func, _ in parsed}
    has_python = any(".py:" in where for _, where in parsed)
    innermost, inner_where = parsed[-1]
    if (innermost, inner_where.rsplit(":", 1)[0]) in _LOOP_ROOTS:
        return NATIVE_LOOP
    saw_protobuf = saw_loop = False
    fallback: str | None = None
    for func, where in reversed(parsed):
        if func in _WAITS:
            return WAITING
        if func in _SENDS or func in _RECEIVES:
            if names & {"uv_async_send", "uv__async_send", "UVAsync_send"}:
                return HANDOFF
            if "eventfd_write" in names or "sock_recv" in names:
                return GRPC_LOOP if has_python else GRPC_CORE
            return SEND if func in _SENDS else RECEIVE
        ours = _ours(func, where)
        if ours is not None:
            return ours
        if "onnxruntime" in where:
            return ORT
        if _is_protobuf(where):
            saw_protobuf = True
            continue
        if _is_grpc(func, where):
            if saw_protobuf:
                return RESPONSE
            return GRPC_LOOP if has_python else GRPC_CORE
        if "_queuemodule.c" in where or func.startswith("_queue_SimpleQueue"):
            return HANDOFF
        if "call_soon_threadsafe" in func or "set_result" in func:
            return HANDOFF
        if fallback is None and func in _GRPC_WAITS and where.startswith("asyncio/tasks.py"):
            fallback = GRPC_LOOP
        saw_loop = saw_loop or _is_loop(func, where)
    return fallback or (LOOP if saw_loop else OTHER)


def thread_of(stack: tuple[str, ...]) -> tuple[int, int, str]:
    """(pid, tid, thread name) of a stack recorded with --subprocesses --threads (0s when absent)."""
    pid = tid = 0
    name = ""
    for frame in stack[:3]:
        if frame.startswith("process "):
            pid = int(frame[len("process "):].split(":", 1)[0])
        elif frame.startswith("thread ("):
            head, _, name = frame.partition(": ")
            tid = int(head[len("thread ("):].rstrip(")"), 0)
    return pid, tid, name.strip()


def thread_kind(comm: str, name: str) -> str | None:
    """The stage of a thread's whole CPU when its own samples do not tell (None: they do)."""
    if comm in ("event_engine", "grpc_global_tim", "lifeguard") or "_poll_wrapper" in name:
        return GRPC_CORE
    if not name:
        return ORT if comm == "python" else OTHER
    return None


def read_raw(lines: Iterable[str]) -> Counter[tuple[str, ...]]:
    """Stacks and their sample counts from py-spy's raw output."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def breakdown(stacks: Counter[tuple[str, ...]]) -> tuple[Counter[str], int]:
    """Samples per stage, and the samples left out as WAITING."""
    shares: Counter[str] = Counter()
    waiting = 0
    for stack, count in stacks.items():
        stage = classify(list(stack))
        if stage == WAITING:
            waiting += count
        else:
            shares[stage] += count
    return shares, waiting


def breakdown_by_thread(stacks: Counter[tuple[str, ...]]) -> dict[tuple[int, int], tuple[str, Counter[str]]]:
    """Per (pid, tid): the thread's name and its samples per stage (WAITING left out)."""
    threads: dict[tuple[int, int], tuple[str, Counter[str]]] = {}
    for stack, count in stacks.items():
        pid, tid, name = thread_of(stack)
        stage = classify(list(stack))
        if stage == WAITING:
            continue
        entry = threads.setdefault((pid, tid), (name, Counter()))
        entry[1][stage] += count
    return threads
