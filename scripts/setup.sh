#!/usr/bin/env bash
# Creates .venv and installs ortserve into it. Safe to run again.
#   scripts/setup.sh            everything: the server, the exporters (CPU torch) and the test tools
#                               (including NVIDIA's perf_analyzer and genai-perf under bench/tools/)
#   scripts/setup.sh --runtime  the server and its clients only (what serving needs; used by the Dockerfile)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "ortserve needs Python >= 3.10" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check"

# apt_install_for_tests COMMAND SERVICE PACKAGE...: installs the Debian packages unless COMMAND is there already,
# then stops and disables SERVICE where the package started one.
apt_install_for_tests() {
    local command=$1 service=$2
    shift 2
    if command -v "$command" >/dev/null || [ -x "/usr/sbin/$command" ]; then
        return
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now "$service" >/dev/null 2>&1 || true
    elif [ -x "/etc/init.d/$service" ]; then
        $sudo "/etc/init.d/$service" stop >/dev/null 2>&1 || true
        $sudo update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
}
# The runtime's stamp: a hash of what decides its install (the dependency spec and the Python), written once
# the server is installed; both set-ups write it, so serve.sh after test.sh installs nothing either.
stamp=$(cat pyproject.toml setup.py <(.venv/bin/python -VV) 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "${1:-}" = "--runtime" ]; then
    # Installed already for this spec: nothing to do (a second start is instant and needs no package index).
    if [ "$(cat .venv/.ortserve-runtime-stamp 2>/dev/null)" = "$stamp" ] \
        && .venv/bin/python -c 'import server' 2>/dev/null; then
        exit 0
    fi
    $PIP install --quiet --upgrade pip
    $PIP install --quiet -e .
    echo "$stamp" > .venv/.ortserve-runtime-stamp
else
    $PIP install --quiet --upgrade pip
    # The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build, and
    # the exporters only need the CPU. TORCH_SPEC overrides it.
    $PIP install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    $PIP install --quiet -e ".[export,dev]"
    echo "$stamp" > .venv/.ortserve-runtime-stamp
    # The test suite runs a short genai-perf profile against the server.
    bash bench/setup_genai_perf.sh
    # Debian packages the tests run: nodejs/npm (the Node.js client, tests/test_node_client.py), prometheus and
    # promtool (tests/test_prometheus.py starts its own Prometheus), nginx (tests/test_replicas.py starts its own,
    # on loopback). The packages' own services (Prometheus on :9090, nginx on :80) are stopped: nothing uses them.
    apt_install_for_tests npm npm nodejs npm
    apt_install_for_tests prometheus prometheus prometheus
    apt_install_for_tests nginx nginx nginx
    # The Node.js client's locked dependencies, installed again only when node_modules is missing or older than
    # the lock file.
    if [ ! -d clients/node/node_modules ] || [ clients/node/package-lock.json -nt clients/node/node_modules ]; then
        (cd clients/node && npm ci --loglevel=error --no-audit --no-fund >/dev/null)
    fi
fi
