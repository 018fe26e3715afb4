#!/usr/bin/env bash
# Installs llama.cpp's server (PyPI llama-cpp-python[server], a CPU build compiled from its sdist) into its own
# venv, bench/tools/llamacpp-venv, plus the GGUF converter that llama.cpp ships (convert_hf_to_gguf.py, with the
# gguf-py package vendored beside it in the same sdist), for bench/run_llm_vs_llamacpp.py. Its own venv: the
# server pins its own fastapi/pydantic/numpy, and the converter wants transformers and torch (the CPU wheel).
# Safe to run again: each step is skipped when its result is already there.
#
# The build compiles llama.cpp's C/C++ sources (about 15-25 minutes on 2 cores). GGML_NATIVE=ON: the library is
# built for this machine's CPU (AVX2/AVX-512 where present), as a user building it here would.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/tools/llamacpp-venv
SRC=bench/tools/llamacpp-src
LLAMA_CPP_PYTHON_VERSION=0.3.36
# The project venv's torch and transformers: the converter only reads the saved tensors and the tokenizer.
TORCH_VERSION=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import llama_cpp, llama_cpp.server' 2>/dev/null; then
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-binary llama-cpp-python \
        "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
fi
# The converter's dependencies (it imports torch for safetensors/pt checkpoints, and transformers for the
# tokenizer); the gguf package it uses comes from the sdist's vendored gguf-py, so that writer and reader agree.
if ! "$VENV/bin/python" -c 'import torch, transformers, sentencepiece' 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "torch==$TORCH_VERSION" transformers sentencepiece safetensors protobuf
fi
# The sdist carries llama.cpp's tree (vendor/llama.cpp): keep it (the converter, its conversion/ package and
# gguf-py, and the server's sources for the llama-server build below).
if [ ! -f "$SRC/convert_hf_to_gguf.py" ] || [ ! -f "$SRC/tools/server/CMakeLists.txt" ]; then
    TMP=$(mktemp -d)
    "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$TMP"
    tar -xzf "$TMP"/llama_cpp_python-*.tar.gz -C "$TMP"
    rm -rf "$SRC"
    mv "$TMP"/llama_cpp_python-*/vendor/llama.cpp "$SRC"
    rm -f "$SRC/.git"  # a submodule pointer into the sdist's absent repository: CMake's version lookup trips on it
    rm -rf "$TMP"
fi
# llama.cpp's own HTTP server (llama-server, C++) from the same tree: llama-cpp-python's server answers one
# request at a time (a lock around the model), while llama-server decodes many streams in one batch (parallel
# slots, continuous batching), so it is the llama.cpp to compare a batching server with. No web UI (it would
# be fetched from the network), no HTTPS; the same GGML_NATIVE CPU build as the Python package.
SERVER=bench/tools/llamacpp-build/bin/llama-server
if [ ! -x "$SERVER" ]; then
    GENERATOR=()
    command -v ninja >/dev/null && GENERATOR=(-G Ninja)
    cmake -S "$SRC" -B bench/tools/llamacpp-build "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >/dev/null
    cmake --build bench/tools/llamacpp-build --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >/dev/null
fi
"$SERVER" --version 2>&1 | grep -i version
"$VENV/bin/python" -c 'import llama_cpp; print("llama.cpp venv ready: llama-cpp-python", llama_cpp.__version__)'
