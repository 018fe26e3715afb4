"""A server started under `taskset -c 0` sizes itself for one CPU: one process, one intra-op thread."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
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
