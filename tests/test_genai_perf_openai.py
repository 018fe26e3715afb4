"""NVIDIA genai-perf with its OpenAI endpoint types (completions and chat, streaming) against the HTTP front end."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess
from tests.test_genai_perf import read_metrics

GENAI_PERF = ROOT / "bench" / "tools" / "genai-venv" / "bin" / "genai-perf"


@pytest.fixture(scope="module")
def genai_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    repo = tmp_path_factory.mktemp("genai_openai_repo")
    shutil.copytree(ROOT / "model_repository" / "bytes_decoder", repo / "bytes_decoder")
    server = ServerProcess(repo, tmp_path_factory.mktemp("genai_openai_server"))
    yield server
    assert server.stop() == 0, server.log()


@pytest.mark.parametrize("endpoint_type", ["completions", "chat"])
def test_genai_perf_openai_endpoint(endpoint_type: str, genai_server: ServerProcess, tmp_path: Path) -> None:
    if not GENAI_PERF.exists():
        pytest.fail("genai-perf is not installed: run scripts/setup.sh (it runs bench/setup_genai_perf.sh)")
    command = [
        str(GENAI_PERF), "profile", "-m", "bytes_decoder", "--endpoint-type", endpoint_type, "--streaming",
        "-u", genai_server.http_url, "--tokenizer", str(ROOT / "bench" / "tools" / "byte_tokenizer"),
        "--concurrency", "2", "--request-count", "8", "--num-prompts", "8",
        "--synthetic-input-tokens-mean", "16", "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", "16", "--output-tokens-stddev", "0",
        # Every request runs to its 16 tokens: the byte decoder may sample its end token sooner.
        "--extra-inputs", "ignore_eos:true",
    ]
    # bench/tools/env.sh puts perf_analyzer (which genai-perf drives) and its libraries on the paths.
    shell = f'. "{ROOT}/bench/tools/env.sh" && exec "$@"'
    run = subprocess.run(
        ["bash", "-c", shell, "genai-perf", *command], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = read_metrics(next(tmp_path.glob("artifacts/*/profile_export_genai_perf.csv")))
    assert float(metrics["Request Count (count)"]["Value"]) == 8
    assert float(metrics["Output Sequence Length (tokens)"]["min"]) >= 16
    assert float(metrics["Time To First Token (ms)"]["avg"]) > 0
    assert float(metrics["Inter Token Latency (ms)"]["avg"]) > 0
    assert float(metrics["Output Token Throughput (tokens/sec)"]["Value"]) > 0
