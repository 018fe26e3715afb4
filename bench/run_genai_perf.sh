#!/usr/bin/env bash
# NVIDIA genai-perf against ortserve's text-generation convention (kserve endpoint, TensorRT-LLM payloads).
#   bash bench/run_genai_perf.sh [CONCURRENCY [REQUESTS [OUTPUT_TOKENS]]]     (defaults 4, 40, 32)
# Environment: GENAI_URL=host:port profiles a running server instead of starting one on the example
# repository; GENAI_OUT=dir is where genai-perf writes its artifacts (default bench/out/genai).
# perf_analyzer 2.51 only finds this model's server statistics when given its version, hence `-x 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${1:-4}
REQUESTS=${2:-40}
OUTPUT_TOKENS=${3:-32}
OUT=$(mkdir -p "${GENAI_OUT:-bench/out/genai}" && cd "${GENAI_OUT:-bench/out/genai}" && pwd)
bash bench/setup_genai_perf.sh
. bench/tools/env.sh
URL=${GENAI_URL:-}
if [ -z "$URL" ]; then
    rm -f "$OUT/port"
    .venv/bin/python -m server serve --host 127.0.0.1 --port 0 --http-port 0 --workers 1 --log-level warning \
        --port-file "$OUT/port" &
    SERVER=$!
    trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
    for _ in $(seq 1 600); do [ -s "$OUT/port" ] && break; sleep 0.1; done
    URL="127.0.0.1:$(cat "$OUT/port")"
fi
TOKENIZER="$(pwd)/bench/tools/byte_tokenizer"
cd "$OUT"
"$OLDPWD/bench/tools/genai-venv/bin/genai-perf" profile -m bytes_decoder --endpoint-type kserve \
    --backend tensorrtllm --streaming -u "$URL" --tokenizer "$TOKENIZER" --concurrency "$CONCURRENCY" \
    --synthetic-input-tokens-mean 16 --synthetic-input-tokens-stddev 0 \
    --output-tokens-mean "$OUTPUT_TOKENS" --output-tokens-stddev 0 --num-prompts 20 \
    --request-count "$REQUESTS" -- -x 1
