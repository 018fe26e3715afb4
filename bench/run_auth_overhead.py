"""What --auth-config costs the request path (issue 13): `python bench/run_auth_overhead.py
[--rounds 4] [--seconds 6] [--concurrency 64] [--workers 2]`.

Serves bench/models.py's MLP with two ortserve servers, both up for the whole run: "off" (no auth) and
"on" (`--auth-config` with an API key, plus ten other keys so the constant-time comparison walks a
realistic list). Each round measures both, interleaved (off on, then on off in the next round), with:

perf_analyzer over HTTP and over gRPC, concurrency 64, batch 1 per request, with `-H 'authorization:Bearer
<key>'` on the "on" server: an HTTP header, and on gRPC call metadata (perf_analyzer sends -H as metadata
when the name is lower case, as gRPC requires; "Authorization" makes its gRPC client abort).

Prints each round, the medians, and the median of the per-round on/off ratios of throughput and of the
servers' CPU per inference (the steadier figure on a shared machine). Needs bench/setup_perf_analyzer.sh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_batching import OUT, ROOT, bench_repository, perf_env, read_perf_csv  # noqa: E402
from run_metrics_overhead import Server, group_cpu_s, start_server, stop_server  # noqa: E402

KEY = "bench-api-key-7c1d0e9a4b2f"
MODEL = "mlp"


def write_auth_config(path: Path) -> None:
    """The measured key and ten others (entries the comparison walks on every request)."""
    keys = [{"name": f"other-{i}", "key_sha256": hashlib.sha256(f"other-{i}".encode()).hexdigest(),
             "roles": ["infer"]} for i in range(10)]
    keys.append({"name": "bench", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(), "roles": ["infer"],
                 "models": ["mlp*"]})
    path.write_text(json.dumps({"api_keys": keys}))


def perf(protocol: str, port: int, concurrency: int, interval_ms: int, key: str | None, label: str) -> dict[str, float]:
    """perf_analyzer over `protocol`; on the "on" server with the key in a header (HTTP) or metadata (gRPC)."""
    csv_path = OUT / f"pa_auth_{protocol}_{label}.csv"
    csv_path.unlink(missing_ok=True)
    command = [
        str(BENCH / "tools" / "perf_analyzer"), "-m", MODEL, "-i", protocol, "-u", f"127.0.0.1:{port}",
        "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
        "--max-trials", "10", "-s", "30", "-f", str(csv_path),
    ]
    if key is not None:
        # gRPC metadata keys must be lower case (the C core refuses "Authorization"); HTTP accepts either.
        command += ["-H", f"authorization:Bearer {key}"]
    result = subprocess.run(command, env=perf_env(), capture_output=True, text=True, timeout=600)
    return read_perf_csv(csv_path, result)


def inference_count(server: Server) -> int:
    """The model's inference count over all workers (KServe statistics), asked with the key."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    connection.request("GET", f"/v2/models/{MODEL}/stats", headers={"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"statistics of {MODEL} on {server.label}: {response.status}")
    return sum(int(s["inference_count"]) for s in json.loads(body)["model_stats"])


def measured(server: Server, run: object) -> dict[str, float]:
    cpu, count = group_cpu_s(server.process.pid), inference_count(server)
    result: dict[str, float] = run()  # type: ignore[operator]
    cpu, count = group_cpu_s(server.process.pid) - cpu, inference_count(server) - count
    result["cpu_us"] = cpu / max(1, count) * 1e6
    return result


def check_auth(server: Server) -> None:
    """The "on" server must refuse a request without the key: guards against measuring two open servers."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    connection.request("GET", f"/v2/models/{MODEL}")
    status = connection.getresponse().status
    connection.close()
    if status != 401:
        raise RuntimeError(f"the auth server answered {status} without a key")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--protocols", nargs="+", choices=["grpc", "http"], default=["grpc", "http"])
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    repo = bench_repository(MODEL)
    auth_file = OUT / "auth_bench.yaml"
    write_auth_config(auth_file)
    servers = {
        "off": start_server("auth_off", ROOT, repo, args.workers, []),
        "on": start_server("auth_on", ROOT, repo, args.workers, ["--auth-config", str(auth_file)]),
    }
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        check_auth(servers["on"])
        for round_index in range(args.rounds):
            for protocol in args.protocols:
                # The order alternates from round to round, so that a position effect hits both alike.
                order = list(servers.items()) if round_index % 2 == 0 else list(reversed(servers.items()))
                for label, server in order:
                    key = KEY if label == "on" else None
                    port = server.http_port if protocol == "http" else server.grpc_port

                    def run(protocol: str = protocol, port: int = port, key: str | None = key,
                            label: str = label) -> dict[str, float]:
                        return perf(protocol, port, args.concurrency, int(args.seconds * 1000), key, label)
                    result = measured(server, run)
                    runs.setdefault((protocol, label), []).append(result)
                    print(f"round {round_index + 1} {protocol} auth {label}: {result['rate']:.0f} infer/s, "
                          f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
                          f"server CPU {result['cpu_us']:.0f} us/inference", flush=True)
    finally:
        for server in servers.values():
            stop_server(server.process)
    print(f"\n{MODEL}, concurrency {args.concurrency}, batch 1 per request, --workers {args.workers}, "
          f"{args.rounds} interleaved rounds\n")
    print("| protocol | auth | median infer/s | median p50 ms | median p99 ms | median server CPU us/inf |")
    print("|---|---|---:|---:|---:|---:|")
    for (protocol, label), results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in ("rate", "p50_ms", "p99_ms", "cpu_us")}
        print(f"| {protocol} | {label} | {med['rate']:.0f} | {med['p50_ms']:.2f} | {med['p99_ms']:.2f} | "
              f"{med['cpu_us']:.0f} |")
    print("\n| protocol | on/off throughput per round | median | CPU/inference on/off median |")
    print("|---|---|---:|---:|")
    for protocol in args.protocols:
        on, off = runs[(protocol, "on")], runs[(protocol, "off")]
        rates = [a["rate"] / b["rate"] for a, b in zip(on, off, strict=True)]
        cpu = statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in zip(on, off, strict=True))
        print(f"| {protocol} | {', '.join(f'{r:.3f}' for r in rates)} | {statistics.median(rates):.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
