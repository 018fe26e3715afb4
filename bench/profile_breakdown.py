"""Where a request's server CPU goes (issue 15): `python bench/profile_breakdown.py [--workers 2] [--rounds 3]`.

Serves bench/models.py's MLP alone (a copy of `bench/out/repo/mlp` in `bench/out/profile_repo`, so the
workers have few threads) with `ortserve --workers N`, and the bare grpc.aio echo server
(bench/echo_server.py, 2 processes, uvloop) beside it as the transport's reference. For concurrency 1
and 64 (batch 1 per request, perf_analyzer over gRPC):

1. CPU per request, exact and unprofiled: perf_analyzer sends exactly `--requests-c1` / `--requests-c64`
   requests (`--request-count`); every thread's utime+stime is read from /proc before and after and
   divided by the requests the server counted (ModelStatistics; the echo: the requests sent). Rounds
   alternate ortserve and echo; medians. Threads are told apart by /proc and `py-spy dump`: the
   workers' main threads (the event loop), the model's instance thread (`ort-<model>-<i>`), gRPC's
   C-core threads and grpc.aio's poller, and threads with no Python state (ONNX Runtime's pool).
2. Stages: while perf_analyzer keeps the same load up, py-spy samples the Python stacks of every
   thread of every process without stopping them (`--nonblocking --threads --subprocesses`), once for
   every thread and once for the GIL holder only (`--gil`, used for the loop threads: it leaves out the
   samples of a loop that was woken but waits for a CPU, which all land in uvloop's poll). Each sample
   is charged to a stage by bench/stack_classes.py (its docstring has the rules: the innermost frame
   of ours / ONNX Runtime / gRPC decides). Each thread's CPU over the window (/proc) is split in the
   proportions of its samples; threads without Python frames are charged by what they are.
3. A stage's CPU per request = the unprofiled CPU per request x its share of the window's CPU.

Native code that the event loop runs with no Python frame of its own (uvloop, gRPC's Cython layer and
C core, the response's SerializeToString, the send) cannot be split by a Python profiler; it is one row,
and the echo server's same row is the transport's floor. `--native` unwinds native frames too, but
py-spy must stop the process to do so and then over-samples syscalls (stack_classes' docstring).
`--intra-op-threads N` serves the MLP with that ONNX Runtime intra-op thread count. Prints markdown and
writes bench/out/profile_breakdown.md. Needs bench/setup_perf_analyzer.sh and py-spy (a dev dependency).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run_batching  # noqa: E402
import stack_classes  # noqa: E402
from run_batching import OUT, PYTHON, ROOT, perf_env, stop  # noqa: E402

PERF_ANALYZER = BENCH / "tools" / "perf_analyzer"
PY_SPY = Path(PYTHON).parent / "py-spy"
TICKS = os.sysconf("SC_CLK_TCK")
MODEL = "mlp"


def free_port() -> int:
    """A port that was free a moment ago (the echo server takes a fixed port number)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_s(pids: list[int]) -> float:
    return sum(cpu_s(pid) for pid in pids)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Server:
    """A running server: its process, gRPC port and the pids whose CPU counts."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    pids: list[int] = field(default_factory=list)

    def count(self) -> tuple[int, int]:
        """(inferences, executions) so far; the echo counts nothing (-1)."""
        if self.name == "echo":
            return -1, -1
        return model_counts(self.port)


def model_counts(port: int, url: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, int]:
    """(inference_count, execution_count) of the MLP from ModelStatistics (summed over the workers)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url or f"127.0.0.1:{port}") as client:
        stats = client.get_inference_statistics(MODEL, headers=headers, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def profile_repo(intra_op_threads: int | None = None) -> Path:
    """bench/out/profile_repo[_intraN]: the MLP alone (bench/models.py builds bench/out/repo if missing)."""
    suffix = "" if intra_op_threads is None else f"_intra{intra_op_threads}"
    repo, source = OUT / f"profile_repo{suffix}", OUT / "repo"
    if not (source / MODEL).exists():
        subprocess.run([PYTHON, str(BENCH / "models.py"), "--out", str(source)], cwd=ROOT, check=True)
    if not (repo / MODEL).exists():
        repo.mkdir(parents=True, exist_ok=True)
        copy_model(source / MODEL, repo / MODEL, intra_op_threads)
    return repo


def copy_model(source: Path, target: Path, intra_op_threads: int | None = None) -> None:
    """Copies a repository model, with `intra_op_thread_count` appended to its config when given."""
    shutil.copytree(source, target)
    if intra_op_threads is not None:
        with open(target / "config.pbtxt", "a") as config:
            value = f'{{ string_value: "{intra_op_threads}" }}'
            config.write(f'parameters {{ key: "intra_op_thread_count" value {value} }}\n')


def start_ortserve(repo: Path, workers: int, port_file: Path) -> Server:
    process, port = run_batching.start_ortserve(repo, workers, port_file)
    server = Server("ortserve", process, port)
    server.pids = process_tree(process.pid)
    return server


def start_echo(answer: str = "now") -> Server:
    """bench/echo_server.py, 2 processes, uvloop; `answer` is its --answer (how ModelInfer's handler answers)."""
    port = free_port()
    process = subprocess.Popen(
        [PYTHON, str(BENCH / "echo_server.py"), "--port", str(port), "--workers", "2", "--uvloop", "--answer", answer],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    server = Server("echo", process, port)
    deadline = time.monotonic() + 60
    while True:  # ready once ServerLive answers (and both processes exist)
        try:
            import tritonclient.grpc as grpcclient

            with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                if client.is_server_live() and len(process_tree(process.pid)) >= 3:
                    break
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                raise
        time.sleep(0.2)
    server.pids = process_tree(process.pid)
    return server


def perf_command(port: int, concurrency: int, requests: int, csv_path: Path | None = None) -> list[str]:
    command = [str(PERF_ANALYZER), "-m", MODEL, "-i", "grpc", "-u", f"127.0.0.1:{port}",
               "--concurrency-range", str(concurrency), "--request-count", str(requests)]
    return command + (["-f", str(csv_path)] if csv_path else [])


def thread_cpu_s(pids: list[int]) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, tid) -> (comm, utime + stime in seconds) of every thread of the processes."""
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            out[(pid, tid)] = (comm, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def thread_delta(
    before: dict[tuple[int, int], tuple[str, float]], after: dict[tuple[int, int], tuple[str, float]]
) -> dict[tuple[int, int], tuple[str, float]]:
    return {key: (comm, cpu - before.get(key, (comm, 0.0))[1]) for key, (comm, cpu) in after.items()}


def python_thread_names(pids: list[int]) -> dict[tuple[int, int], str]:
    """(pid, tid) -> Python thread name, from `py-spy dump` (threads without Python state are absent)."""
    names: dict[tuple[int, int], str] = {}
    for pid in pids:
        dump = subprocess.run([str(PY_SPY), "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
        for line in dump.splitlines():
            if line.startswith("Thread ") and '"' in line:
                head, _, rest = line.partition(" (")
                names[(pid, int(head.split()[1], 0))] = rest.split('"')[1]
    return names


def role(key: tuple[int, int], comm: str, names: dict[tuple[int, int], str]) -> str:
    """What a thread is, for the exact per-thread table."""
    pid, tid = key
    name = names.get(key, "")
    if pid == tid:
        return "event loop thread (main)"
    if name.startswith("ort-"):
        return "model instance thread (InstanceThread)"
    if comm in ("event_engine", "grpc_global_tim", "lifeguard") or "_poll_wrapper" in name:
        return "gRPC C-core threads and grpc.aio's poller"
    if not name and comm == "python":
        return "native threads (ONNX Runtime's intra-op pool)"
    return f"other threads ({name or comm})"


@dataclass
class Measured:
    cpu_us: float  # server CPU per request
    rate: float  # requests/s: concurrency / perf_analyzer's mean latency
    p50_ms: float
    batch: float  # average batch (inferences / executions); 0 for the echo
    roles: dict[str, float]  # CPU us per request by thread role


def measure(
    server: Server, concurrency: int, requests: int, names: dict[tuple[int, int], str], attempts: int = 3
) -> Measured:
    """One unprofiled run of exactly `requests` requests: CPU per request from /proc.

    perf_analyzer 2.51 now and then never exits after its last answer (seen with ortserve and with the
    echo, every request answered): such a run is killed after a generous limit and measured again.
    """
    csv_path = OUT / f"profile_pa_{server.name}.csv"
    csv_path.unlink(missing_ok=True)
    before_count, before = server.count(), thread_cpu_s(server.pids)
    started = time.monotonic()
    try:
        result = subprocess.run(perf_command(server.port, concurrency, requests, csv_path), env=perf_env(),
                                capture_output=True, text=True, timeout=60 + requests / 100)
    except subprocess.TimeoutExpired:
        if attempts <= 1:
            raise
        print(f"perf_analyzer did not exit ({server.name}, c={concurrency}); measuring again", flush=True)
        return measure(server, concurrency, requests, names, attempts - 1)
    wall = time.monotonic() - started
    threads = thread_delta(before, thread_cpu_s(server.pids))
    after_count = server.count()
    if result.returncode != 0 or not csv_path.exists():
        raise RuntimeError(f"perf_analyzer failed: {result.stdout[-1500:]} {result.stderr[-1500:]}")
    if server.name == "echo":
        served, batch = requests, 0.0
    else:
        served = after_count[0] - before_count[0]
        batch = served / max(1, after_count[1] - before_count[1])
    # With --request-count, perf_analyzer's throughput divides by a nominal window and its run
    # ends on a whole second, so neither it nor the wall time gives the rate; a closed loop of
    # `concurrency` clients does (Little's law: concurrency / mean latency).
    header, row = csv_path.read_text().splitlines()[:2]
    p50_us = float(dict(zip(header.split(","), row.split(","), strict=True))["p50 latency"])
    mean = re.search(r"Avg latency: (\d+) usec", result.stdout)
    rate = concurrency / (int(mean.group(1)) / 1e6) if mean else served / wall
    roles: Counter[str] = Counter()
    for key, (comm, cpu) in threads.items():
        roles[role(key, comm, names)] += cpu / served * 1e6
    return Measured(sum(roles.values()), rate, p50_us / 1000, batch, dict(roles))


@dataclass
class Profile:
    cpu: Counter[str]  # CPU seconds per stage over the window
    samples: int
    gil_samples: int
    batch: float
    loop_native_all: float  # share of the loop threads' samples (no --gil) in native code under the loop


def spy(
    server: Server, seconds: float, rate_hz: int, raw_path: Path, gil: bool, native: bool
) -> Counter[tuple[str, ...]]:
    raw_path.unlink(missing_ok=True)
    command = [str(PY_SPY), "record", "--pid", str(server.process.pid), "--subprocesses", "--threads",
               "--format", "raw", "--rate", str(rate_hz), "--duration", str(int(seconds)), "-o", str(raw_path)]
    command += ["--native"] if native else ["--nonblocking"]
    command += ["--gil"] if gil else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if not raw_path.exists():
        raise RuntimeError(f"py-spy failed: {result.stdout[-1500:]} {result.stderr[-1500:]}")
    return stack_classes.read_raw(raw_path.read_text().splitlines())


def profile(
    server: Server, concurrency: int, seconds: float, rate_hz: int, native: bool, names: dict[tuple[int, int], str]
) -> Profile:
    """py-spy over the server's processes while perf_analyzer holds `concurrency` requests in flight.

    Two passes: every thread's samples, and the GIL holder's only (`--gil`). A worker's loop thread
    releases the GIL while it polls, so the second pass leaves out the samples taken while it was
    woken but not yet running (on a busy machine, many: they would all land in uvloop's poll); the
    other threads are split by the first pass (ONNX Runtime runs without the GIL).
    """
    load = subprocess.Popen(perf_command(server.port, concurrency, 50_000_000), env=perf_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tag = f"{server.name}_c{concurrency}"
    try:
        # Warm: wait until the load is flowing (observable: the server's CPU moves).
        start_cpu, deadline = tree_cpu_s(server.pids), time.monotonic() + 60
        while tree_cpu_s(server.pids) - start_cpu < 0.3:
            if load.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("perf_analyzer did not start sending")
            time.sleep(0.1)
        before_count, before = server.count(), thread_cpu_s(server.pids)
        every = spy(server, seconds, rate_hz, OUT / f"profile_{tag}.raw", False, native)
        holding = spy(server, seconds, rate_hz, OUT / f"profile_{tag}_gil.raw", True, native)
        threads = thread_delta(before, thread_cpu_s(server.pids))
        after_count = server.count()
    finally:
        os.killpg(load.pid, signal.SIGKILL)
        load.wait()
    by_thread = stack_classes.breakdown_by_thread(every)
    by_thread_gil = stack_classes.breakdown_by_thread(holding)
    cpu: Counter[str] = Counter()
    loop_all: Counter[str] = Counter()
    for (pid, tid), (comm, seconds_used) in threads.items():
        if seconds_used <= 0:
            continue
        name, counts = by_thread.get((pid, tid), ("", Counter()))
        name = names.get((pid, tid), name)
        if pid == tid:
            loop_all.update(counts)
            counts = by_thread_gil.get((pid, tid), ("", counts))[1] or counts
        kind = stack_classes.thread_kind(comm, name)
        if kind is not None or not counts:
            cpu[kind or stack_classes.OTHER] += seconds_used
            continue
        total = sum(counts.values())
        for stage, n in counts.items():
            cpu[stage] += seconds_used * n / total
    served = after_count[0] - before_count[0]
    batch = served / max(1, after_count[1] - before_count[1]) if server.name != "echo" else 0.0
    loop_total = sum(loop_all.values()) or 1
    return Profile(cpu, sum(every.values()), sum(holding.values()), batch,
                   loop_all[stack_classes.NATIVE_LOOP] / loop_total)


def medians(runs: list[Measured]) -> Measured:
    roles = {r: statistics.median(m.roles.get(r, 0.0) for m in runs) for r in {k for m in runs for k in m.roles}}
    return Measured(statistics.median(m.cpu_us for m in runs), statistics.median(m.rate for m in runs),
                    statistics.median(m.p50_ms for m in runs), statistics.median(m.batch for m in runs), roles)


def table(concurrency: int, runs: dict[str, list[Measured]], profiles: dict[str, Profile]) -> list[str]:
    med = {name: medians(ms) for name, ms in runs.items()}
    ort, echo = med["ortserve"], med["echo"]
    lines = [
        f"#### Concurrency {concurrency}\n",
        f"Unprofiled, median of {len(runs['ortserve'])} runs: ortserve {ort.rate:,.0f} infer/s, p50 "
        f"{ort.p50_ms:.2f} ms, average batch {ort.batch:.1f}, **{ort.cpu_us:.0f} us CPU/request**; "
        f"echo {echo.rate:,.0f} infer/s, p50 {echo.p50_ms:.2f} ms, **{echo.cpu_us:.0f} us CPU/request**; "
        f"ratio **{ort.cpu_us / echo.cpu_us:.2f}x**.",
        "",
        "| thread (exact, /proc) | ortserve us/request | echo us/request |",
        "|---|---:|---:|",
    ]
    for name in sorted(set(ort.roles) | set(echo.roles), key=lambda r: -ort.roles.get(r, 0.0)):
        lines.append(f"| {name} | {ort.roles.get(name, 0.0):.1f} | {echo.roles.get(name, 0.0):.1f} |")
    lines += ["", "| stage (sampled) | ortserve share | ortserve us/request | echo share | echo us/request |",
              "|---|---:|---:|---:|---:|"]
    totals = {name: sum(prof.cpu.values()) or 1.0 for name, prof in profiles.items()}
    for category in stack_classes.CATEGORIES:
        cells = []
        for name in ("ortserve", "echo"):
            share = profiles[name].cpu.get(category, 0.0) / totals[name]
            cells.append(f"{share:.1%} | {share * med[name].cpu_us:.1f}")
        if any(profiles[name].cpu.get(category, 0.0) for name in profiles):
            lines.append(f"| {category} | {' | '.join(cells)} |")
    lines.append(f"| **total** | 100% | {ort.cpu_us:.0f} | 100% | {echo.cpu_us:.0f} |")
    lines.append("")
    for name, prof in profiles.items():
        extra = f", average batch {prof.batch:.1f} while profiled" if name == "ortserve" else ""
        lines.append(f"- {name}: {prof.samples} samples of every thread, {prof.gil_samples} of the GIL holder; "
                     f"without --gil, {prof.loop_native_all:.0%} of the loop threads' samples sit in native code "
                     f"under the loop (woken, waiting for a CPU, or working without the GIL){extra}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="unprofiled runs per server and concurrency")
    parser.add_argument("--requests-c1", type=int, default=3000)
    parser.add_argument("--requests-c64", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=5, help="py-spy's window per pass, server and concurrency")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true",
                        help="py-spy --native (stops the process to unwind; over-samples syscalls, see stack_classes)")
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="serve the MLP with this intra_op_thread_count parameter (default: the server's choice)")
    args = parser.parse_args()
    if not PERF_ANALYZER.exists():
        subprocess.run(["bash", str(BENCH / "setup_perf_analyzer.sh")], cwd=ROOT, check=True)
    OUT.mkdir(exist_ok=True)
    repo = profile_repo(args.intra_op_threads)
    threads = "" if args.intra_op_threads is None else f", intra_op_thread_count {args.intra_op_threads}"
    lines = [f"ortserve --workers {args.workers} serving the MLP alone{threads}; py-spy at {args.rate} Hz"
             f"{' (--native)' if args.native else ''}; load average before: {load_average()}", ""]
    print(lines[0], flush=True)
    ortserve = start_ortserve(repo, args.workers, OUT / "profile_port")
    echo = start_echo()
    servers = {"ortserve": ortserve, "echo": echo}
    names = python_thread_names(ortserve.pids + echo.pids)
    try:
        for concurrency, requests in ((1, args.requests_c1), (64, args.requests_c64)):
            runs: dict[str, list[Measured]] = {name: [] for name in servers}
            measure(ortserve, concurrency, max(200, requests // 10), names)  # warm-up (first-run allocations)
            for _ in range(args.rounds):
                for name, server in servers.items():
                    runs[name].append(measure(server, concurrency, requests, names))
                    print(f"c={concurrency} {name}: {runs[name][-1].cpu_us:.0f} us CPU/request", flush=True)
            profiles = {
                name: profile(server, concurrency, args.seconds, args.rate, args.native, names)
                for name, server in servers.items()
            }
            lines += table(concurrency, runs, profiles) + [""]
            print("\n".join(table(concurrency, runs, profiles)), flush=True)
    finally:
        for server in servers.values():
            stop(server.process)
    lines.append(f"load average after: {load_average()}")
    print(lines[-1])
    (OUT / "profile_breakdown.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
