"""NVIDIA genai-perf (driving perf_analyzer) profiles the text-generation model through Triton's convention."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess


def read_metrics(csv_path: Path) -> dict[str, dict[str, str]]:
    """genai-perf's CSV: a table of per-request metrics, a blank line, then a table of totals
    (numbers over 999 carry thousands separators)."""
    metrics: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for row in csv.reader(csv_path.read_text().splitlines()):
        if not row:
            header = []
        elif not header:
            header = row
        else:
            # "1,056.91"; genai-perf writes every row as wide as its table's header.
            metrics[row[0]] = dict(zip(header[1:], (value.replace(",", "") for value in row[1:]), strict=True))
    return metrics


def test_genai_perf_short_profile(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    if not (ROOT / "bench" / "tools" / "genai-venv" / "bin" / "genai-perf").exists():
        pytest.fail("genai-perf is not installed: run scripts/setup.sh (it runs bench/setup_genai_perf.sh)")
    repo = tmp_path_factory.mktemp("genai_repo")
    shutil.copytree(ROOT / "model_repository" / "bytes_decoder", repo / "bytes_decoder")
    server = ServerProcess(repo, tmp_path_factory.mktemp("genai_server"))
    try:
        env = {**os.environ, "GENAI_URL": server.address, "GENAI_OUT": str(tmp_path)}
        run = subprocess.run(
            ["bash", "bench/run_genai_perf.sh", "2", "8", "16"], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        assert server.stop() == 0, server.log()
    metrics = read_metrics(next(tmp_path.glob("artifacts/*/profile_export_genai_perf.csv")))
    assert float(metrics["Request Count (count)"]["Value"]) == 8
    # genai-perf counts the streamed text with the byte tokenizer: every request got its 16 tokens.
    assert float(metrics["Output Sequence Length (tokens)"]["min"]) >= 16
    assert float(metrics["Time To First Token (ms)"]["avg"]) > 0
    assert float(metrics["Inter Token Latency (ms)"]["avg"]) > 0
    assert float(metrics["Output Token Throughput (tokens/sec)"]["Value"]) > 0
