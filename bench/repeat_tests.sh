#!/usr/bin/env bash
# Runs tests N times in a row and stops at the first failure; with --loaded, two busy-loop processes
# keep both cores of a 2-core machine saturated for the whole time (the "loaded machine" check).
#
#   bash bench/repeat_tests.sh 20                       # the whole suite, 20 times, idle machine
#   bash bench/repeat_tests.sh 20 --loaded              # the same with both cores kept busy
#   bash bench/repeat_tests.sh 20 --loaded tests/test_batching.py tests/unit/test_batcher.py
#
# Extra arguments go to pytest. Needs the venv from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:?usage: repeat_tests.sh N [--loaded] [pytest args...]}
shift
burners=()
if [ "${1:-}" = "--loaded" ]; then
    shift
    for _ in $(seq "$(nproc)"); do
        .venv/bin/python -c 'while True: pass' &
        burners+=($!)
    done
    trap 'kill "${burners[@]}" 2>/dev/null || true' EXIT
    echo "loaded: ${#burners[@]} busy-loop processes (pids ${burners[*]})"
fi
start=$(date +%s)
for i in $(seq "$runs"); do
    run_start=$(date +%s)
    if ! .venv/bin/python -m pytest -q -p no:cacheprovider "$@" > "/tmp/ortserve-repeat-$i.log" 2>&1; then
        tail -30 "/tmp/ortserve-repeat-$i.log"
        echo "run $i of $runs FAILED (log: /tmp/ortserve-repeat-$i.log)"
        exit 1
    fi
    echo "run $i of $runs passed in $(( $(date +%s) - run_start )) s: $(tail -1 "/tmp/ortserve-repeat-$i.log")"
done
echo "all $runs runs passed in $(( $(date +%s) - start )) s"
