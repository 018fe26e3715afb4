"""Is py-spy's sampling fair to syscalls here? `python bench/pyspy_bias_check.py`.

bench/profile_breakdown.py samples Python stacks without stopping the process (`--nonblocking`)
rather than unwinding native frames (`--native`, which stops it). This is why: a child process runs
a loop of two parts whose cost is timed first: 20 calls of asyncio.get_running_loop (on Python 3.11
each makes a getpid syscall) and a small pure-Python sum. py-spy then samples it both ways, and the
share of samples in the first part is compared with its share of the time. On the project's 2-core
VM, --native put nearly every sample in getpid when the calls sit in the coroutine itself (and was
fair when they sat in a function of their own); --nonblocking was fair both ways.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"
OUT = Path(__file__).resolve().parent / "out"

WORKLOAD = """
import asyncio, sys, time

def work():
    total = 0
    for i in range(200):
        total += i * i
    return total

async def main(seconds):
    # Time each part alone first: the expected share of the get_running_loop calls.
    rounds = 3000
    start = time.perf_counter()
    for _ in range(rounds):
        for _ in range(20):
            asyncio.get_running_loop()
    a = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(rounds):
        work()
    b = time.perf_counter() - start
    print(a / (a + b), flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):  # MEASURED
            asyncio.get_running_loop()  # MEASURED
        work()

asyncio.run(main(float(sys.argv[1])))
"""
# The frames of the measured calls, as py-spy names them (code run with -c is "<string>").
MEASURED = tuple(f"main (<string>:{number})" for number, line in enumerate(WORKLOAD.splitlines(), start=1)
                 if "# MEASURED" in line)


def sampled_share(raw: Path) -> float:
    total = inside = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            total += int(count)
            inside += int(count) if any(frame in stack for frame in MEASURED) else 0
    return inside / max(1, total)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    child = subprocess.Popen([sys.executable, "-c", WORKLOAD, "14"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    expected = float(child.stdout.readline())
    time.sleep(0.5)  # let the measured loop start (a benchmark script, not a test)
    shares = {}
    modes = (("--native (stops the process)", ["--native"]), ("--nonblocking (Python frames)", ["--nonblocking"]))
    for mode, flags in modes:
        raw = OUT / f"pyspy_bias{flags[0].replace('-', '_')}.raw"
        raw.unlink(missing_ok=True)
        subprocess.run([str(PY_SPY), "record", "--pid", str(child.pid), "--format", "raw", "--rate", "500",
                        "--duration", "4", "-o", str(raw), *flags], capture_output=True, check=True)
        shares[mode] = sampled_share(raw)
    child.wait()
    print(f"time share of the get_running_loop calls, timed alone: {expected:.0%}")
    for mode, share in shares.items():
        print(f"share of py-spy samples, {mode}: {share:.0%}")


if __name__ == "__main__":
    main()
