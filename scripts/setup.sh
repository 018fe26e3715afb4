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
    # The Node.js client (clients/node; tests/test_node_client.py runs it): its locked dependencies, installed
    # again only when node_modules is missing or older than the lock file.
    if ! command -v npm >/dev/null; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    fi
    if [ ! -d clients/node/node_modules ] || [ clients/node/package-lock.json -nt clients/node/node_modules ]; then
        (cd clients/node && npm ci --loglevel=error --no-audit --no-fund >/dev/null)
    fi
    # tests/test_prometheus.py runs Debian's prometheus and promtool (it starts its own Prometheus).
    if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        # The package starts a system Prometheus on :9090 where an init system lets it; nothing here uses it.
        if [ -d /run/systemd/system ]; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
        elif [ -x /etc/init.d/prometheus ]; then
            $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
            $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
        fi
    fi
    # tests/test_replicas.py runs Debian's nginx in front of three replicas (it starts its own, on loopback).
    if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
        # The package starts a system nginx on :80 where an init system lets it; nothing here uses it.
        if [ -d /run/systemd/system ]; then $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
        elif [ -x /etc/init.d/nginx ]; then
            $SUDO /etc/init.d/nginx stop >/dev/null 2>&1 || true
            $SUDO update-rc.d nginx disable >/dev/null 2>&1 || true
        fi
    fi
fi
