"""Code health kept in the suite: ruff finds nothing, and no module of server/ grows past 500 lines."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

MAX_MODULE_LINES = 500
GENERATED = ("server/rpc/pb/", "server/schema/model_config_pb2")


def test_ruff_finds_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_no_module_is_over_500_lines() -> None:
    long = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(GENERATED):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            long.append(f"{relative}: {lines}")
    assert not long, long
