"""How clients spread over `--workers 2` (issue 15): `python bench/run_worker_spread.py [--repeats 4]`.

With SO_REUSEPORT the kernel hands each new connection to one of the listening workers (a hash of
the connection's addresses and ports); every request of a connection then goes to that worker. So a
client's spread depends on how many connections it opens. Serves the MLP alone
(bench/out/profile_repo) with `ortserve --workers 2`, and for each client, `--repeats` times (each
time with new connections, so a new draw of the hash):

- perf_analyzer over gRPC at concurrency 64 (`--request-count`);
- a tritonclient.grpc.aio client with 64 requests in flight over one channel (what tritonclient
  users and most gRPC clients do: one channel, one HTTP/2 connection);
- the same with 4 channels, requests dealt round-robin over them (gRPC's C core gives channels to
  one target with the same arguments one shared connection), and with 2 and 4 channels that each
  get their own connection (`grpc.use_local_subchannel_pool`);

it records each worker's requests (its own ModelStatistics, asked on its private Unix socket with the
peer header, as the workers ask each other), each worker process's CPU (/proc) and the connections
each worker holds on the public port (`ss -tnp`, taken while the client runs). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from profile_breakdown import (  # noqa: E402
    MODEL,
    OUT,
    Server,
    cpu_s,
    model_counts,
    perf_command,
    profile_repo,
    start_ortserve,
)
from run_batching import perf_env, stop  # noqa: E402


def worker_argument(pid: int, option: str) -> str:
    """A worker's command-line option (--peer-dir, --worker-index), from /proc."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return args[args.index(option.encode()) + 1].decode()


def worker_counts(workers: list[int]) -> list[int]:
    """Each worker's own inference count (its private socket, with the peer header: local only)."""
    counts = []
    for index, pid in enumerate(workers):
        url = f"unix:{worker_argument(pid, '--peer-dir')}/worker-{index}.sock"
        counts.append(model_counts(0, url, {"ortserve-peer-local": "1"})[0])
    return counts


def connections(port: int, workers: list[int]) -> list[int]:
    """Established connections on the public port held by each worker (from `ss -tnp`)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return [sum(f"pid={pid}," in line for line in out.splitlines()) for pid in workers]


@dataclass
class Spread:
    requests: list[int]
    cpu_s: list[float]
    conns: list[int]
    rate: float


async def _tritonclient_load(port: int, channels: int, own_connections: bool, concurrency: int, total: int,
                             seen: list[list[int]], workers: list[int]) -> None:
    import tritonclient.grpc.aio as aioclient

    # gRPC's C core shares one subchannel (one TCP connection) among channels to the same target
    # with the same arguments; a local subchannel pool per channel gives each its own connection.
    args = [("grpc.use_local_subchannel_pool", 1)] if own_connections else None
    clients = [aioclient.InferenceServerClient(f"127.0.0.1:{port}", channel_args=args) for _ in range(channels)]
    data = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    sent = 0

    async def one_slot(slot: int) -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            tensor = aioclient.InferInput("INPUT", [1, 256], "FP32")
            tensor.set_data_from_numpy(data)
            await clients[(slot + sent) % channels].infer(MODEL, [tensor])

    async def watch() -> None:
        # The most connections seen while the load runs.
        while True:
            conns = await asyncio.to_thread(connections, port, workers)
            if sum(conns) > sum(seen[-1] if seen else [0]):
                seen.append(conns)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(one_slot(i) for i in range(concurrency)))
    finally:
        watcher.cancel()
        for client in clients:
            await client.close()


def run_client(server: Server, workers: list[int], client: str, total: int) -> Spread:
    before_counts, before_cpu = worker_counts(workers), [cpu_s(pid) for pid in workers]
    seen: list[list[int]] = []
    started = time.monotonic()
    if client == "perf_analyzer":
        load = subprocess.Popen(perf_command(server.port, 64, total), env=perf_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while load.poll() is None:
            conns = connections(server.port, workers)
            if sum(conns) > sum(seen[-1] if seen else [0]):
                seen.append(conns)
            time.sleep(0.05)
        if load.returncode != 0:
            raise RuntimeError("perf_analyzer failed")
    else:
        channels = int(client.split()[0])
        own = "own connections" in client
        asyncio.run(_tritonclient_load(server.port, channels, own, 64, total, seen, workers))
    wall = time.monotonic() - started
    counts = [a - b for a, b in zip(worker_counts(workers), before_counts, strict=True)]
    cpu = [cpu_s(pid) - b for pid, b in zip(workers, before_cpu, strict=True)]
    return Spread(counts, cpu, seen[-1] if seen else [0] * len(workers), sum(counts) / wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--requests", type=int, default=6000)
    args = parser.parse_args()
    server = start_ortserve(profile_repo(), 2, OUT / "spread_port")
    workers = [pid for pid in server.pids if pid != server.process.pid]
    workers.sort(key=lambda pid: int(worker_argument(pid, "--worker-index")))
    clients = ["perf_analyzer", "1 channel", "4 channels", "2 channels, own connections",
               "4 channels, own connections"]
    results: dict[str, list[Spread]] = {c: [] for c in clients}
    try:
        for _ in range(args.repeats):
            for client in clients:
                spread = run_client(server, workers, client, args.requests)
                results[client].append(spread)
                print(f"{client}: requests {spread.requests}, CPU s {[round(c, 1) for c in spread.cpu_s]}, "
                      f"connections {spread.conns}, {spread.rate:,.0f} infer/s", flush=True)
    finally:
        stop(server.process)
    print("\n| client | connections per worker (each run) | requests on the busier worker (each run) "
          "| CPU on the busier worker (each run) | median infer/s |")
    print("|---|---|---|---|---:|")
    for client, spreads in results.items():
        conns = ", ".join("/".join(str(c) for c in s.conns) for s in spreads)
        shares = ", ".join(f"{max(s.requests) / max(1, sum(s.requests)):.0%}" for s in spreads)
        cpus = ", ".join(f"{max(s.cpu_s) / max(1e-9, sum(s.cpu_s)):.0%}" for s in spreads)
        rate = statistics.median(s.rate for s in spreads)
        print(f"| {client} | {conns} | {shares} | {cpus} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
