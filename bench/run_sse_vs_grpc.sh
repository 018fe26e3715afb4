#!/usr/bin/env bash
# Streaming text over SSE vs gRPC at the same load (issue 11), against one server, runs interleaved.
#   bash bench/run_sse_vs_grpc.sh [RUNS [CONCURRENCY [OUTPUT_TOKENS [REQUESTS]]]]   (defaults 3, 32, 64, 256)
# Each run measures, one after another:
#   1. bench/generation_load.py --transport both (gRPC ortserve.v1.TextGeneration, then SSE /v1/completions
#      with the lean raw client), and with SSE_HTTPX=1 the httpx client as well (the earlier figures);
#      with GRPC_PER_USER=1 also gRPC over one TCP connection per stream: one channel is one connection, which
#      --workers N puts on one worker (one batch of CONCURRENCY), while SSE's connections spread over them;
#   2. genai-perf (perf_analyzer, C++) over gRPC: Triton ModelStreamInfer, text_input/text_output
#      (TensorRT-LLM payloads on the kserve endpoint);
#   3. genai-perf over SSE: OpenAI completions, streaming.
# Both genai-perf runs use the same synthetic prompts (16 tokens), exactly OUTPUT_TOKENS generated per
# request and CONCURRENCY streams. No request may stop early at the end token: over SSE `ignore_eos: true`
# in the body; over gRPC min_length = max_tokens (--output-tokens-mean-deterministic), because perf_analyzer
# refuses an input the model configuration does not declare ("The input or output 'ignore_eos' is not found
# in the model configuration") and the text convention declares min_length, not ignore_eos.
# Environment: GRPC_URL=host:port and HTTP_URL=http://host:port profile a running server instead of
# starting `ortserve serve` (default --workers) on the example repository; OUT=dir for the artifacts
# (default bench/out/sse_vs_grpc). The machine's load (uptime) is printed with every measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUNS=${1:-3}
CONCURRENCY=${2:-32}
OUTPUT_TOKENS=${3:-64}
REQUESTS=${4:-256}
OUT=$(mkdir -p "${OUT:-bench/out/sse_vs_grpc}" && cd "${OUT:-bench/out/sse_vs_grpc}" && pwd)
bash bench/setup_genai_perf.sh >/dev/null
# perf_analyzer and the CUDA runtime it links against (bench/tools/env.sh says the same, but is
# written with the path of the checkout that ran the setup).
CUDART=$(dirname "$(find "$ROOT/bench/tools/cuda" -name 'libcudart.so.12' | head -n 1)")
export LD_LIBRARY_PATH="$CUDART:${LD_LIBRARY_PATH:-}"
export PATH="$ROOT/bench/tools:$PATH"
GENAI_PERF="$ROOT/bench/tools/genai-venv/bin/genai-perf"
TOKENIZER="$ROOT/bench/tools/byte_tokenizer"

if [ -z "${GRPC_URL:-}" ] || [ -z "${HTTP_URL:-}" ]; then
    rm -f "$OUT/port" "$OUT/port.http"
    .venv/bin/python -m server serve --host 127.0.0.1 --port 0 --http-port 0 --metrics-port 0 \
        --log-level warning --port-file "$OUT/port" &
    SERVER=$!
    trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
    for _ in $(seq 1 1200); do [ -s "$OUT/port" ] && [ -s "$OUT/port.http" ] && break; sleep 0.1; done
    GRPC_URL="127.0.0.1:$(cat "$OUT/port")"
    HTTP_URL="http://127.0.0.1:$(cat "$OUT/port.http")"
fi

common=(-m bytes_decoder --streaming --tokenizer "$TOKENIZER" --concurrency "$CONCURRENCY"
        --synthetic-input-tokens-mean 16 --synthetic-input-tokens-stddev 0
        --output-tokens-mean "$OUTPUT_TOKENS" --output-tokens-stddev 0 --num-prompts 64
        --request-count "$REQUESTS" --warmup-request-count "$CONCURRENCY")

genai() {  # genai() NAME ARGS...: one genai-perf profile into $OUT/run$run/NAME
    local dir="$OUT/run$run/$1"; shift
    rm -rf "$dir" && mkdir -p "$dir"
    echo "== run $run $(basename "$dir"): $(uptime)"
    (cd "$dir" && "$GENAI_PERF" profile "${common[@]}" "$@" >"$dir/log.txt" 2>&1) ||
        { tail -n 30 "$dir/log.txt"; return 1; }
}

for run in $(seq 1 "$RUNS"); do
    mkdir -p "$OUT/run$run"
    echo "== run $run generation_load (raw SSE client): $(uptime)"
    .venv/bin/python bench/generation_load.py --url "$GRPC_URL" --http-url "$HTTP_URL" --transport both \
        --levels "$CONCURRENCY" --max-tokens "$OUTPUT_TOKENS" | tee "$OUT/run$run/generation_load_raw.md"
    if [ -n "${GRPC_PER_USER:-}" ]; then
        echo "== run $run generation_load (raw SSE client, gRPC connection per stream): $(uptime)"
        .venv/bin/python bench/generation_load.py --url "$GRPC_URL" --http-url "$HTTP_URL" --transport both \
            --levels "$CONCURRENCY" --max-tokens "$OUTPUT_TOKENS" --grpc-connections per-user |
            tee "$OUT/run$run/generation_load_peruser.md"
    fi
    if [ -n "${SSE_HTTPX:-}" ]; then
        echo "== run $run generation_load (httpx SSE client): $(uptime)"
        .venv/bin/python bench/generation_load.py --url "$GRPC_URL" --http-url "$HTTP_URL" --transport both \
            --levels "$CONCURRENCY" --max-tokens "$OUTPUT_TOKENS" --sse-client httpx |
            tee "$OUT/run$run/generation_load_httpx.md"
    fi
    # perf_analyzer 2.51 only finds this model's server statistics when given its version, hence `-x 1`.
    genai grpc --endpoint-type kserve --backend tensorrtllm -u "$GRPC_URL" --output-tokens-mean-deterministic -- -x 1
    genai sse --endpoint-type completions -u "$HTTP_URL" --extra-inputs ignore_eos:true
done
.venv/bin/python bench/sse_vs_grpc_summary.py "$OUT"
