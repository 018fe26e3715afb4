"""CPU affinity: a server under `taskset -c 0` sizes itself for one CPU (one process, one intra-op thread); two
workers are pinned to a CPU each (`--cpu-affinity auto`) but for gRPC's own threads and a text-generation
model's, which keep both, and `--cpu-affinity none` pins nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.export import ExportSpec, export_torch
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")


def test_one_cpu_gives_one_worker_and_one_thread(tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    repository = tmp_path / "repo"
    torch.manual_seed(0)
    export_torch(torch.nn.Linear(4, 2), (torch.zeros(2, 4),), ExportSpec(["x"], ["y"]), repository, "tiny")
    port_file, log_path = tmp_path / "port", tmp_path / "server.log"
    # --workers 0 is the automatic count, which on this machine's CPUs alone could be 2.
    command = [
        "taskset", "-c", "0", sys.executable, "-m", "server", "serve", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0",
        "--port-file", str(port_file), "--workers", "0",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        port = int(port_file.read_text())
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = grpcclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert client.infer("tiny", [tensor]).as_numpy("y").shape == (1, 2)
        client.close()
        text = log_path.read_text()
        # A lone server (no supervisor, no "with N workers") that gave ONNX Runtime one thread.
        assert re.search(rf"ortserve listening on 127\.0\.0\.1:{port}\n", text), text
        assert "workers" not in text and "worker 0" not in text, text
        assert "loaded model 'tiny' version 1 on CPUExecutionProvider (1 instance(s), max_batch_size 64, " \
            "intra-op threads 1)" in text, text
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        if children.exists():
            assert children.read_text().strip() == ""
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()


def _thread_masks(pid: int) -> dict[int, tuple[str, list[int]]]:
    """Each thread of the process: its name (gRPC names its threads; ours and ONNX Runtime's keep the
    process's) and the CPUs it may run on."""
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            masks[int(tid)] = (name, sorted(os.sched_getaffinity(int(tid))))
        except OSError:  # the thread ended meanwhile
            pass
    return masks


def _start_two_workers(tmp_path: Path, cpus: list[int], *extra: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    repository = tmp_path / "repo"
    torch.manual_seed(0)
    export_torch(torch.nn.Linear(4, 2), (torch.zeros(2, 4),), ExportSpec(["x"], ["y"]), repository, "tiny")
    shutil.copytree(ROOT / "model_repository" / "bytes_decoder", repository / "bytes_decoder")
    # Two intra-op threads given, so ONNX Runtime's pool thread takes its creator's mask: left to choose (0),
    # ORT pins its pool threads to CPUs itself, whatever ours.
    with open(repository / "bytes_decoder" / "config.pbtxt", "a") as config:
        config.write('parameters { key: "intra_op_thread_count" value { string_value: "2" } }\n')
    port_file, log_path = tmp_path / "port", tmp_path / "server.log"
    command = [
        "taskset", "-c", ",".join(map(str, cpus)), sys.executable, "-m", "server", "serve",
        "--model-repository", str(repository), "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
        "--metrics-port", "0", "--port-file", str(port_file), "--workers", "2", "--log-level", "info", *extra,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not port_file.exists() or not port_file.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    return process, port_file, log_path


def _serve_both_kinds(port_file: Path) -> None:
    """A tensor inference over gRPC and a text generation over HTTP, each answered correctly."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{int(port_file.read_text())}")
    tensor = grpcclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert client.infer("tiny", [tensor]).as_numpy("y").shape == (1, 2)
    client.close()
    http_port = int(port_file.with_name(port_file.name + ".http").read_text())
    body = json.dumps({"text_input": "ab", "max_tokens": 3, "parameters": {"temperature": 0}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v2/models/bytes_decoder/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert "text_output" in json.loads(response.read())


def _grpc_threads_on(cpus: list[int], pid: int) -> bool:
    """Whether every thread gRPC named (any name but the main thread's) may run on exactly `cpus`."""
    masks = _thread_masks(pid)
    main_name = masks[pid][0]
    return all(mask == cpus for name, mask in masks.values() if name != main_name)


def _workers(process: subprocess.Popen[bytes]) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def _two_cpus_to_pin() -> bool:
    from server.runtime import cpus

    quota = cpus.cgroup_cpus()  # a cgroup quota under 2 CPUs turns pinning off (cpus.worker_cpus)
    return len(os.sched_getaffinity(0)) >= 2 and (quota is None or quota >= 2)


two_cpus = pytest.mark.skipif(not _two_cpus_to_pin(), reason="pinning two workers needs two CPUs, unquoted")


@two_cpus
def test_two_workers_are_pinned_to_a_cpu_each_and_text_models_keep_both(tmp_path: Path) -> None:
    both = sorted(os.sched_getaffinity(0))[:2]
    process, port_file, log_path = _start_two_workers(tmp_path, both)
    try:
        _serve_both_kinds(port_file)
        text = log_path.read_text()
        pinned = sorted(int(cpu) for cpu in re.findall(r"worker \d \(pid \d+\) serving on port \d+, pinned to CPU\(s\) "
                                                       r"(\d+)\n", text))
        assert pinned == both, text
        workers = _workers(process)
        assert len(workers) == 2
        # gRPC's event engine may grow its pool from a pinned thread; the worker lets such threads go within
        # seconds (app.GRPC_THREADS_RESCAN_S). Wait for that, generously.
        deadline = time.monotonic() + 60
        while not all(_grpc_threads_on(both, pid) for pid in workers):
            assert time.monotonic() < deadline, [_thread_masks(pid) for pid in workers]
            time.sleep(0.5)
        own = {}
        text_model_threads = 0
        for pid in workers:
            masks = _thread_masks(pid)
            main_name, own[pid] = masks[pid]  # the worker's main thread: the event loop
            assert len(own[pid]) == 1, masks
            ours = [mask for name, mask in masks.values() if name == main_name]
            grpcs = [mask for name, mask in masks.values() if name != main_name]
            # gRPC's named threads (event engine, timer, lifeguard) are released to both CPUs once started.
            assert grpcs and all(mask == both for mask in grpcs), masks
            # Ours and ONNX Runtime's run on the worker's own CPU, but for the text model's, which use both.
            assert all(mask in (own[pid], both) for mask in ours), masks
            assert sum(mask == own[pid] for mask in ours) >= 2, masks  # the loop and the tensor model's thread
            text_model_threads += sum(mask == both for mask in ours)
        assert sorted(own.values()) == [[both[0]], [both[1]]]
        # Each worker's text-model session has its pool thread on both CPUs; the worker that generated also has
        # its generation thread there.
        assert text_model_threads >= 3
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()


@two_cpus
def test_cpu_affinity_none_leaves_every_thread_on_every_cpu(tmp_path: Path) -> None:
    both = sorted(os.sched_getaffinity(0))[:2]
    process, port_file, log_path = _start_two_workers(tmp_path, both, "--cpu-affinity", "none")
    try:
        _serve_both_kinds(port_file)
        assert "pinned" not in log_path.read_text()
        for pid in _workers(process):
            assert all(mask == both for _, mask in _thread_masks(pid).values())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()
