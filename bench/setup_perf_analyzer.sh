#!/usr/bin/env bash
# Installs NVIDIA's perf_analyzer for the benchmarks into bench/tools/ (not committed).
# The tritonclient 2.51.0 manylinux wheel ships the binary; newer wheels need a newer
# glibc. It needs Debian's libb64-0d and libcudart.so.12 (from PyPI's
# nvidia-cuda-runtime-cu12) even on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")"
TOOLS=tools
mkdir -p "$TOOLS"
if ! ldconfig -p | grep -q libb64.so.0d; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null;
    else sudo apt-get update -qq && sudo apt-get install -y -qq libb64-0d >/dev/null; fi
fi
if [ ! -x "$TOOLS/perf_analyzer" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
        -d "$TOOLS/wheels" tritonclient==2.51.0
    python3 - "$TOOLS" <<'PY'
import sys, zipfile, glob, os
tools = sys.argv[1]
wheel = glob.glob(os.path.join(tools, "wheels", "tritonclient-2.51.0-*.whl"))[0]
with zipfile.ZipFile(wheel) as zf:
    name = next(n for n in zf.namelist() if n.endswith("/bin/perf_analyzer"))
    with open(os.path.join(tools, "perf_analyzer"), "wb") as out:
        out.write(zf.read(name))
os.chmod(os.path.join(tools, "perf_analyzer"), 0o755)
PY
fi
if [ ! -d "$TOOLS/cuda" ]; then
    python3 -m pip install --quiet --no-deps --target "$TOOLS/cuda" "nvidia-cuda-runtime-cu12==12.*"
fi
CUDART_DIR=$(dirname "$(find "$TOOLS/cuda" -name 'libcudart.so.12' | head -n 1)")
cat > "$TOOLS/env.sh" <<ENV
export LD_LIBRARY_PATH="$(pwd)/$CUDART_DIR:\${LD_LIBRARY_PATH:-}"
export PATH="$(pwd)/$TOOLS:\$PATH"
ENV
. "$TOOLS/env.sh"
perf_analyzer --version 2>/dev/null | head -n 1 || perf_analyzer --help 2>&1 | head -n 2
