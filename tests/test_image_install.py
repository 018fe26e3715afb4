"""The image's install steps, run outside Docker (CI has no Docker daemon): the build stage's COPY lines lay out a
source tree, its pip RUN lines install into a fresh virtual environment, and the result serves the example.

This catches what hadolint cannot: a file copied where the next step does not look for it, a dependency the
package needs but the dependency layer lacks, a package that imports something it does not install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import venv
from pathlib import Path

import httpx

from tests.conftest import ROOT


def build_stage_steps() -> tuple[list[tuple[str, str]], list[str]]:
    """The build stage's COPY (source, destination) pairs and its RUN commands after WORKDIR, in order."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text.split("\nFROM ")[1]  # the first stage after the ARG lines: the build stage
    copies: list[tuple[str, str]] = []
    runs: list[str] = []
    after_workdir = False
    for line in stage.splitlines():
        line = line.strip()
        if line.startswith("WORKDIR"):
            after_workdir = True
        elif line.startswith("COPY") and "--from" not in line:
            *sources, destination = line.split()[1:]
            copies += [(source, destination) for source in sources]
        elif line.startswith("RUN") and after_workdir:
            runs.append(line[len("RUN"):].strip())
    return copies, runs


def test_the_image_install_steps_give_a_server_that_serves_the_example(tmp_path: Path) -> None:
    copies, runs = build_stage_steps()
    assert copies and runs
    src = tmp_path / "src"
    src.mkdir()
    for source, destination in copies:
        target = src / destination
        if destination.endswith("/"):
            target = target / Path(source).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(ROOT / source, target)
    prefix = tmp_path / "ortserve"
    venv.create(prefix, with_pip=True)
    for command in runs:
        command = command.replace("/opt/ortserve", str(prefix)).replace('"${ONNXRUNTIME}"', "cpu")
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=src, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    listed = subprocess.run([str(prefix / "bin" / "pip"), "list"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^onnxruntime\s", listed, re.M) and "onnxruntime-gpu" not in listed  # the CPU build

    # The installed server, run as the image runs it: from its own prefix, outside the checkout.
    workdir = tmp_path / "run"
    workdir.mkdir()
    models = tmp_path / "models"
    shutil.copytree(ROOT / "model_repository", models)
    port_file = workdir / "port"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(prefix / "bin" / "ortserve"), "serve", "--model-repository", str(models), "--host", "127.0.0.1",
             "--port", "0", "--http-port", "0", "--metrics-port", "0", "--workers", "1", "--port-file",
             str(port_file)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        http_port = (workdir / "port.http").read_text()
        assert httpx.get(f"http://127.0.0.1:{http_port}/v2/models/digits/ready").status_code == 200
        address = f"127.0.0.1:{port_file.read_text()}"
        health = subprocess.run(
            [str(prefix / "bin" / "python"), "-m", "server.healthcheck", "--address", address],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
        )
        assert health.stdout.strip() == "SERVING", health.stderr
    finally:
        process.terminate()
        code = process.wait(timeout=60)
    assert code == 0, log_path.read_text()[-3000:]
