#!/usr/bin/env bash
# Sets up the runtime and serves the example model repository on ports 8001 (gRPC) and 8000 (HTTP).
# Extra arguments go to `ortserve serve` (for example --port 9001 --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --runtime
exec .venv/bin/ortserve serve --model-repository model_repository "$@"
