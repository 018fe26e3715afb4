#!/usr/bin/env bash
# Installs NVIDIA's genai-perf into bench/tools/genai-venv (its own venv: it pins its own libraries)
# and writes bench/tools/byte_tokenizer, a Hugging Face tokenizer directory describing bytes_decoder's
# byte vocabulary (genai-perf counts tokens with it; nothing is downloaded from a model hub).
# genai-perf drives perf_analyzer, so this runs bench/setup_perf_analyzer.sh first. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup_perf_analyzer.sh >/dev/null
if [ ! -x bench/tools/genai-venv/bin/genai-perf ]; then
    python3 -m venv bench/tools/genai-venv
    bench/tools/genai-venv/bin/python -m pip install --quiet --disable-pip-version-check genai-perf==0.0.16
fi
[ -f bench/tools/byte_tokenizer/tokenizer.json ] ||
    bench/tools/genai-venv/bin/python bench/make_byte_tokenizer.py --out bench/tools/byte_tokenizer
