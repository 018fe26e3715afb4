"""mypy finds no type errors in server/ (the generated pb/ package excepted)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_server_package_type_checks() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "server"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
