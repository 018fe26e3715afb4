#!/usr/bin/env bash
# NVIDIA genai-perf against ortserve's text-generation convention (kserve endpoint, TensorRT-LLM payloads).
#   bash bench/run_genai_perf.sh [CONCURRENCY]   (default 4)
# Installs genai-perf into bench/tools/genai-venv (not the project venv: it pins its own libraries), writes
# a Hugging Face tokenizer describing bytes_decoder's byte vocabulary, starts ortserve on the example
# repository and profiles bytes_decoder. Needs bench/setup_perf_analyzer.sh first (genai-perf drives
# perf_analyzer). perf_analyzer only reads server statistics here when given a model version, hence `-x 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${1:-4}
[ -x bench/tools/genai-venv/bin/genai-perf ] || {
    python3 -m venv bench/tools/genai-venv
    bench/tools/genai-venv/bin/pip install --quiet genai-perf
}
bench/tools/genai-venv/bin/python bench/make_byte_tokenizer.py --out bench/out/byte_tokenizer
. bench/tools/env.sh
mkdir -p bench/out/genai
rm -f bench/out/genai/port
.venv/bin/python -m server serve --host 127.0.0.1 --port 0 --workers 1 --log-level warning \
    --port-file bench/out/genai/port &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 600); do [ -s bench/out/genai/port ] && break; sleep 0.1; done
cd bench/out/genai
../../tools/genai-venv/bin/genai-perf profile -m bytes_decoder --endpoint-type kserve --backend tensorrtllm \
    --streaming -u "127.0.0.1:$(cat port)" --tokenizer ../byte_tokenizer --concurrency "$CONCURRENCY" \
    --synthetic-input-tokens-mean 16 --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean 32 --output-tokens-stddev 0 --num-prompts 20 --request-count 40 -- -x 1
