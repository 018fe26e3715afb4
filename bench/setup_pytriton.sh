#!/usr/bin/env bash
# Installs PyTriton (PyPI nvidia-pytriton: NVIDIA Triton Inference Server's tritonserver binary with the
# Python backend, driven from Python) into its own venv, bench/tools/pytriton-venv, with numpy and the CPU
# build of ONNX Runtime at ortserve's ONNX Runtime version, for bench/pytriton_server.py and
# bench/run_http_vs_triton.py. Its own venv: PyTriton pins its own tritonclient/protobuf/numpy.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/tools/pytriton-venv
PYTRITON_VERSION=0.7.0
# The same ONNX Runtime release as the project venv (onnxruntime-gpu there, the CPU wheel here).
ORT_VERSION=$(.venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || echo 1.31.1)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import pytriton, onnxruntime, numpy' 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nvidia-pytriton==$PYTRITON_VERSION" numpy "onnxruntime==$ORT_VERSION"
fi
# The wheel's tritonserver must start here (`--help` prints its usage and exits 1, so look for the usage).
TRITONSERVER=$("$VENV/bin/python" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver/bin/tritonserver")')
USAGE=$("$TRITONSERVER" --help 2>&1 || true)
[[ "$USAGE" == *--model-repository* ]] ||
    { echo "tritonserver from nvidia-pytriton does not start: $TRITONSERVER" >&2; exit 1; }
"$VENV/bin/python" -c 'import pytriton, onnxruntime, numpy; print("pytriton venv ready: onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)'
