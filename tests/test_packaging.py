"""The Dockerfile installs exactly as the README's command does, and the README starts with the two commands."""

from __future__ import annotations

import re

from tests.conftest import ROOT

INSTALL = "bash scripts/setup.sh --runtime"


def test_dockerfile_and_serve_script_share_the_install_step() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    serve = (ROOT / "scripts" / "serve.sh").read_text()
    assert f"RUN {INSTALL}" in dockerfile
    assert INSTALL in serve
    docker_pip = [line for line in dockerfile.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert docker_pip == [], "the Dockerfile must install through scripts/setup.sh only"
    # Same server command: the Dockerfile's CMD serves what serve.sh serves.
    assert "--model-repository model_repository" in serve
    assert '"--model-repository", "model_repository"' in dockerfile


def test_dockerfile_runs_as_non_root_with_a_health_check() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER ortserve$", dockerfile, re.M)
    assert "server.healthcheck" in dockerfile and "HEALTHCHECK" in dockerfile
    assert "EXPOSE 8001" in dockerfile


def test_readme_starts_with_the_two_commands_and_ci_calls_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    assert blocks[0].strip() == "bash scripts/serve.sh"
    assert blocks[1].strip() == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
