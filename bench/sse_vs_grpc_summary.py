"""Tables of SSE/gRPC ratios from bench/run_sse_vs_grpc.sh's artifacts, per run and their median.

    python bench/sse_vs_grpc_summary.py bench/out/sse_vs_grpc

Reads runN/generation_load_raw.md (and _peruser.md, _httpx.md when present; the rows of generation_load.py's
table) and runN/{grpc,sse}/artifacts/*/profile_export_genai_perf.csv (genai-perf's totals).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path


def genai_metrics(run_dir: Path, name: str) -> tuple[float, float] | None:
    """(output tokens/s, TTFT p50 ms) of one genai-perf profile, or None when it did not finish."""
    found = sorted((run_dir / name).glob("artifacts/*/profile_export_genai_perf.csv"))
    if not found:
        return None
    metrics: dict[str, dict[str, str]] = {}
    header: list[str] = []
    # The CSV is a table of per-request metrics, a blank line, then a table of totals;
    # numbers over 999 carry thousands separators.
    for row in csv.reader(found[0].read_text().splitlines()):
        if not row:
            header = []
        elif not header:
            header = row
        else:
            metrics[row[0]] = dict(zip(header[1:], (v.replace(",", "") for v in row[1:]), strict=False))
    return (float(metrics["Output Token Throughput (tokens/sec)"]["Value"]),
            float(metrics["Time To First Token (ms)"]["p50"]))


def load_metrics(path: Path) -> dict[str, tuple[float, float]]:
    """{transport: (tokens/s, TTFT p50 ms)} from generation_load.py's markdown table."""
    rows: dict[str, tuple[float, float]] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[1] in ("grpc", "sse"):
            rows[cells[1]] = (float(cells[7]), float(cells[2]))
    return rows


def table(title: str, pairs: list[tuple[int, tuple[float, float], tuple[float, float]]]) -> None:
    """Prints one markdown table: a row per run (gRPC, SSE, ratios) and the medians of the ratios."""
    print(f"\n{title}\n")
    print("| run | gRPC tokens/s | SSE tokens/s | SSE / gRPC | TTFT p50 gRPC ms | TTFT p50 SSE ms | TTFT SSE vs gRPC |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    throughput, ttft = [], []
    for run, (g_tps, g_ttft), (s_tps, s_ttft) in pairs:
        throughput.append(s_tps / g_tps)
        ttft.append(s_ttft / g_ttft - 1)
        print(f"| {run} | {g_tps:,.0f} | {s_tps:,.0f} | {s_tps / g_tps:.0%} | {g_ttft:.1f} | {s_ttft:.1f} "
              f"| {s_ttft / g_ttft - 1:+.0%} |")
    if pairs:
        print(f"| median | | | {statistics.median(throughput):.0%} | | | {statistics.median(ttft):+.0%} |")


def main() -> None:
    out = Path(sys.argv[1])
    runs = sorted((int(d.name[3:]), d) for d in out.glob("run*") if d.name[3:].isdigit())
    for client in ("raw", "peruser", "httpx"):
        pairs = []
        for run, d in runs:
            rows = load_metrics(d / f"generation_load_{client}.md")
            if "grpc" in rows and "sse" in rows:
                pairs.append((run, rows["grpc"], rows["sse"]))
        if pairs:
            label = {"raw": "raw SSE client, one gRPC channel",
                     "peruser": "raw SSE client, a gRPC connection per stream",
                     "httpx": "httpx SSE client, one gRPC channel"}[client]
            table(f"generation_load.py (Python clients; {label})", pairs)
    pairs = []
    for run, d in runs:
        grpc_row, sse_row = genai_metrics(d, "grpc"), genai_metrics(d, "sse")
        if grpc_row and sse_row:
            pairs.append((run, grpc_row, sse_row))
    table("genai-perf / perf_analyzer (C++ clients): Triton ModelStreamInfer vs OpenAI completions SSE", pairs)


if __name__ == "__main__":
    main()
