#!/usr/bin/env bash
# Creates .venv and installs ortserve with its test and export extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build, and the
# exporters only need the CPU. Override with TORCH_SPEC for another build.
$PIP install --quiet "${TORCH_SPEC:-torch==2.13.0}"
$PIP install --quiet -e ".[export,dev]"
