"""What Prometheus metrics cost the request path (issue 12): `python bench/run_metrics_overhead.py
[--rounds 3] [--interval-ms 4000] [--concurrency 64] [--workers 2] [--base 02af0c1] [--log-requests]`.

Serves bench/models.py's MLP with three ortserve servers, all up for the whole run, and drives each with
perf_analyzer over gRPC at concurrency 64, batch 1 per request, interleaved in rounds (A B C A B C ...):

- A: the code before metrics existed, from a temporary git worktree of `--base` (the commit before the
  metrics commit) that shares this checkout's .venv; removed at the end;
- B: the current code with `--allow-metrics false` (the per-request statistics are still recorded);
- C: the current code with metrics on, while a scraper thread GETs /metrics from the metrics port once a
  second (as Prometheus would); the scrapes are counted and timed;
- D (with `--log-requests`): the current code with metrics on and the access log on (`--log-requests true
  --log-level info`, the log written to /dev/null), without the scraper.

Each round prints every server's figures; the summary gives the median over rounds of each figure and of
the per-round ratios B/A, C/A, C/B (and D/B) of throughput and p50/p99 latency. Medians of per-round ratios
are the figures to read: on a shared 2-core machine the absolute rates drift from minute to minute.
Needs bench/setup_perf_analyzer.sh to have run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import OUT, PYTHON, ROOT, perf_analyzer  # noqa: E402

BASE_COMMIT = "02af0c1"  # the commit just before 55a1334 (Prometheus metrics)


@dataclass
class Server:
    """A running ortserve (supervisor and workers in their own process group) and its ports."""

    label: str
    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int | None


def start_server(label: str, source: Path, repo: Path, workers: int, extra: list[str],
                 stderr_to: Path | None = None) -> Server:
    """`python -m server serve` run from `source` (a checkout), on free ports written to port files.

    The process starts from `source` as its working directory, so `-m server` imports that checkout's
    code (the working directory comes first on sys.path), and the workers inherit it.
    """
    port_file = OUT / f"metrics_bench_{label}_port"
    for suffix in ("", ".http", ".metrics"):
        port_file.with_name(port_file.name + suffix).unlink(missing_ok=True)
    command = [
        PYTHON, "-m", "server", "serve", "--model-repository", str(repo), "--host", "127.0.0.1", "--port", "0",
        "--http-port", "0", "--metrics-port", "0", "--port-file", str(port_file), "--workers", str(workers),
        "--log-level", "warning", *extra,
    ]
    log = open(stderr_to or os.devnull, "wb")
    process = subprocess.Popen(command, cwd=source, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 300
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"server {label} did not start")
        time.sleep(0.1)
    metrics_file = port_file.with_name(port_file.name + ".metrics")
    metrics_port = int(metrics_file.read_text()) if metrics_file.exists() else None
    http_port = int(port_file.with_name(port_file.name + ".http").read_text())
    return Server(label, process, int(port_file.read_text()), http_port, metrics_port)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the supervisor (it stops its workers); the whole group is killed if it hangs."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
    except ProcessLookupError:
        pass
    process.wait()


def http_get(port: int, path: str, timeout_s: float = 30) -> tuple[int, bytes]:
    """One GET on its own connection: status and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Scraper:
    """GETs /metrics once a second on one keep-alive connection, as Prometheus would, timing each scrape."""

    def __init__(self, port: int, period_s: float = 1.0) -> None:
        self.port = port
        self.period_s = period_s
        self.durations_ms: list[float] = []
        self.sizes: list[int] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.period_s
            started = time.perf_counter()
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                self.failures += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            if response.status != 200:
                self.failures += 1
                continue
            self.durations_ms.append((time.perf_counter() - started) * 1000)
            self.sizes.append(len(body))
        connection.close()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the processes of one process group (a server's)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:  # fields after the name start at the state (field 3): pgrp is field 5
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def inference_count(server: Server, model: str) -> int:
    """The model's inference count over all workers (KServe statistics, which add up the siblings')."""
    status, body = http_get(server.http_port, f"/v2/models/{model}/stats")
    if status != 200:
        raise RuntimeError(f"statistics of {model} on {server.label}: {status}")
    return sum(int(s["inference_count"]) for s in json.loads(body)["model_stats"])


def measured(server: Server, model: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`run()`'s figures plus the server's CPU time per inference (us) over it.

    CPU per inference is the steadier figure on a shared machine: other load slows a server's
    throughput but adds little to the CPU its own requests take (caches and frequency aside).
    """
    cpu, count = group_cpu_s(server.process.pid), inference_count(server, model)
    result = run()
    cpu, count = group_cpu_s(server.process.pid) - cpu, inference_count(server, model) - count
    result["cpu_us"] = cpu / max(1, count) * 1e6
    return result


class BaseWorktree:
    """A detached git worktree of the base commit in a temporary directory, sharing this checkout's .venv."""

    def __init__(self, commit: str) -> None:
        self.commit = commit
        self.parent = Path(tempfile.mkdtemp(prefix="ortserve-base-"))
        self.path = self.parent / "tree"

    def __enter__(self) -> Path:
        subprocess.run(["git", "worktree", "add", "--detach", str(self.path), self.commit], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        (self.path / ".venv").symlink_to(ROOT / ".venv")
        # The compiled sampler is built in place and ignored by git; the MLP never uses it, but A should
        # import the same modules as B and C.
        for built in (ROOT / "server" / "core").glob("*.so"):
            (self.path / "server" / "core" / built.name).symlink_to(built)
        return self.path

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=ROOT, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)
        try:
            self.parent.rmdir()
        except OSError:
            pass


def check_variants(servers: dict[str, Server]) -> None:
    """A must be the code without metrics, B must serve none, C must serve them: guards against a mix-up."""
    if http_get(servers["A"].http_port, "/metrics")[0] != 404:
        raise RuntimeError("server A answers /metrics: it is not the code before metrics")
    if http_get(servers["B"].http_port, "/metrics")[0] != 404 or servers["B"].metrics_port is not None:
        raise RuntimeError("server B serves metrics although --allow-metrics false")
    port = servers["C"].metrics_port
    if port is None or http_get(port, "/metrics")[0] != 200:
        raise RuntimeError("server C does not serve /metrics on its metrics port")


@dataclass
class Results:
    """Every round's perf_analyzer figures per server, and the scrapes taken during C's measurements."""

    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    scrape_ms: list[float] = field(default_factory=list)
    scrape_bytes: list[int] = field(default_factory=list)
    scrape_failures: int = 0

    def ratio(self, top: str, bottom: str, key: str) -> list[float]:
        return [t[key] / b[key] for t, b in zip(self.runs[top], self.runs[bottom], strict=True)]


def measure_rounds(servers: dict[str, Server], args: argparse.Namespace) -> Results:
    """The interleaved rounds; the scraper runs only while C is measured."""
    results = Results(runs={label: [] for label in servers})
    for round_index in range(args.rounds):
        for label, server in servers.items():
            def run(label: str = label, server: Server = server) -> dict[str, float]:
                return perf_analyzer(
                    args.model, server.grpc_port, args.concurrency, args.interval_ms, f"pa_metrics_{label}.csv"
                )

            if label == "C":
                assert server.metrics_port is not None
                with Scraper(server.metrics_port) as scraper:
                    result = measured(server, args.model, run)
                result["scrapes"] = len(scraper.durations_ms)
                results.scrape_ms += scraper.durations_ms
                results.scrape_bytes += scraper.sizes
                results.scrape_failures += scraper.failures
            else:
                result = measured(server, args.model, run)
            results.runs[label].append(result)
            scrapes = f", {result['scrapes']:.0f} scrapes" if "scrapes" in result else ""
            print(f"round {round_index + 1}: {label}: {result['rate']:.0f} infer/s, p50 {result['p50_ms']:.2f} ms, "
                  f"p99 {result['p99_ms']:.2f} ms, server CPU {result['cpu_us']:.0f} us/inference{scrapes}", flush=True)
    return results


def report(results: Results, args: argparse.Namespace, labels: dict[str, str]) -> None:
    """Markdown tables: per round, medians, and the medians of the per-round ratios."""
    print(f"\n{args.model}, concurrency {args.concurrency}, gRPC, batch 1 per request, perf_analyzer "
          f"({args.interval_ms} ms windows), --workers {args.workers}, {args.rounds} rounds\n")
    print("| round | " + " | ".join(f"{k} infer/s | {k} p50 ms | {k} p99 ms | {k} CPU us/inf" for k in labels) + " |")
    print("|---:|" + "---:|---:|---:|---:|" * len(labels))
    for i in range(args.rounds):
        cells = [f"{r['rate']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us']:.0f}"
                 for r in (results.runs[k][i] for k in labels)]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    keys = ("rate", "p50_ms", "p99_ms", "cpu_us")
    print("\n| server | median infer/s | median p50 ms | median p99 ms | median server CPU us/inference |")
    print("|---|---:|---:|---:|---:|")
    for label, name in labels.items():
        med = {key: statistics.median(r[key] for r in results.runs[label]) for key in keys}
        print(f"| {label}: {name} | {med['rate']:.0f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
              f"{med['cpu_us']:.0f} |")
    pairs = [("B", "A"), ("C", "A"), ("C", "B")] + ([("D", "B"), ("D", "A")] if "D" in labels else [])
    print("\n| ratio | throughput (per round) | median | p50 latency median | p99 latency median "
          "| CPU/inference median |")
    print("|---|---|---:|---:|---:|---:|")
    for top, bottom in pairs:
        rates = results.ratio(top, bottom, "rate")
        print(f"| {top}/{bottom} | {', '.join(f'{r:.3f}' for r in rates)} | {statistics.median(rates):.3f} | "
              + " | ".join(f"{statistics.median(results.ratio(top, bottom, key)):.3f}" for key in keys[1:]) + " |")
    if results.scrape_ms:
        print(f"\nScrapes of C during its measurements: {len(results.scrape_ms)} "
              f"({results.scrape_failures} failed), median {statistics.median(results.scrape_ms):.2f} ms, "
              f"max {max(results.scrape_ms):.2f} ms, {statistics.median(results.scrape_bytes):.0f} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", help="a model of bench/models.py (default mlp)")
    parser.add_argument("--workers", type=int, default=2, help="ortserve --workers (default 2)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer measurement window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the servers (default 3)")
    parser.add_argument("--base", default=BASE_COMMIT, help=f"the commit before metrics (default {BASE_COMMIT})")
    parser.add_argument("--log-requests", action="store_true", help="also D: metrics on and the access log on")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    repo = OUT / "repo"
    if not (repo / args.model).exists():
        subprocess.run([PYTHON, str(BENCH / "models.py"), "--out", str(repo)], cwd=ROOT, check=True)
    labels = {"A": f"before metrics ({args.base})", "B": "current, --allow-metrics false",
              "C": "current, metrics on, scraped every second"}
    if args.log_requests:
        labels["D"] = "current, metrics on, --log-requests true (log to /dev/null)"
    variants: dict[str, list[str]] = {"A": [], "B": ["--allow-metrics", "false"], "C": [],
                                      "D": ["--log-requests", "true", "--log-level", "info"]}
    servers: dict[str, Server] = {}
    with BaseWorktree(args.base) as base_tree:
        try:
            for label in labels:
                source = base_tree if label == "A" else ROOT
                servers[label] = start_server(label, source, repo, args.workers, variants[label])
            check_variants(servers)
            results = measure_rounds(servers, args)
        finally:
            for server in servers.values():
                stop_server(server.process)
    report(results, args, labels)


if __name__ == "__main__":
    main()
