"""`slipstream serve --workers N` against one worker, and the monitor's accounting over two workers.

1. Throughput and CPU: the tiny MLP (64→256→256→10, one sample per request, JSON) behind `slipstream serve
   --workers N` for N = 1, 2 (and 4, 8 where the machine has that many CPUs), every server started at once and
   driven by wrk over loopback in interleaved slices; medians over slices. CPU per request is the CPU of the
   whole process tree (parent, workers, monitor process) from /proc, over the requests wrk completed. wrk
   shares the machine with the servers: on 2 cores, a second worker competes with wrk and the other worker
   for the same two CPUs, so what N buys depends on the cores left over.
2. Accounting: `--workers 2 --monitor-db` under wrk at c = 64 for `--monitor-seconds`; once every observed
   row is settled, the totals summed over both workers from /metrics, and the rows in the SQLite log. Exact
   means observed = written + dropped + lost, and written = the rows in the log.

    .venv/bin/python benchmarks/workers.py            # 12 s per server and concurrency, 20 s monitored
    .venv/bin/python benchmarks/workers.py --quick    # about 1.5 minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ROOT, cpu_model, free_port, run_wrk, start, stop, tiny_mlp, tree_cpu_seconds

RESULTS = ROOT / "benchmarks" / "results" / "workers.md"


def serve_cmd(bundle: Path, port: int, workers: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(bundle), "--port",
            str(port), "--workers", str(workers), "--no-access-log", *extra]  # fmt: skip


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_workers(url: str, n: int, timeout_s: float = 120.0) -> None:
    """Until /metrics sums ``n`` workers (each has loaded its model and answers its siblings)."""
    if n == 1:
        return
    deadline = time.monotonic() + timeout_s
    while metrics(url).get("slipstream_workers", 0) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} workers did not come up at {url}")
        time.sleep(0.5)


def throughput(
    bundle: Path, body: dict[str, object], ns: list[int], args: argparse.Namespace, work: Path
) -> list[dict[str, float]]:
    servers: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for n in ns:
            port = free_port()
            servers[n] = (start(serve_cmd(bundle, port, n), port, "tiny"), f"http://127.0.0.1:{port}")
            wait_workers(servers[n][1], n)
        rows = []
        for c in args.concurrency:
            slices: dict[int, list[dict[str, float]]] = {n: [] for n in ns}
            for _ in range(args.rounds):
                for n, (proc, url) in servers.items():
                    before = sum(tree_cpu_seconds(proc.pid))
                    r = run_wrk(f"{url}/v2/models/tiny/infer", body, c, args.duration / args.rounds, work)
                    r["cpu_us"] = 1e6 * (sum(tree_cpu_seconds(proc.pid)) - before) / max(1, r["total"])
                    slices[n].append(r)
            base = statistics.median(s["rps"] for s in slices[ns[0]])
            for n in ns:
                s = slices[n]
                rps = statistics.median(x["rps"] for x in s)
                rows.append({
                    "workers": n, "c": c, "rps": rps, "ratio": rps / base,
                    "p99": statistics.median(x["p99"] for x in s), "errors": sum(x["errors"] for x in s),
                    "cpu_us": statistics.median(x["cpu_us"] for x in s),
                })  # fmt: skip
                print(f"workers={n} c={c}: {rps:,.0f} req/s ({rps / base:.2f}x), "
                      f"{rows[-1]['cpu_us']:.0f} µs CPU/request, p99 {rows[-1]['p99']:.1f} ms", flush=True)  # fmt: skip
        return rows
    finally:
        for proc, _ in servers.values():
            stop(proc)


def accounting(bundle: Path, body: dict[str, object], seconds: float, work: Path) -> dict[str, float]:
    db = work / "monitor.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(serve_cmd(bundle, port, 2, "--monitor-db", str(db)), port, "tiny")
    try:
        wait_workers(url, 2)
        load = run_wrk(f"{url}/v2/models/tiny/infer", body, 64, seconds, work)
        deadline = time.monotonic() + 120
        while (m := metrics(url)).get("slipstream_monitor_predictions_pending", 1) != 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        fate = "slipstream_monitor_predictions_total"
        out = {
            "wrk_requests": load["total"], "wrk_rps": load["rps"], "wrk_errors": load["errors"],
            "observed": m.get(f'{fate}{{outcome="observed",reason=""}}', 0.0),
            "written": m.get(f'{fate}{{outcome="written",reason=""}}', 0.0),
            "dropped": sum(v for k, v in m.items() if k.startswith(fate) and 'outcome="dropped"' in k),
            "lost": m.get(f'{fate}{{outcome="lost",reason=""}}', 0.0),
            "pending": m.get("slipstream_monitor_predictions_pending", -1.0),
            "workers": m.get("slipstream_workers", 0.0),
        }  # fmt: skip
    finally:
        stop(proc)
    conn = sqlite3.connect(db)
    try:
        out["log_rows"] = float(conn.execute("SELECT COALESCE(SUM(rows), 0) FROM prediction_log").fetchone()[0])
    finally:
        conn.close()
    out["exact"] = float(
        out["observed"] == out["written"] + out["dropped"] + out["lost"] and out["written"] == out["log_rows"]
    )
    print("accounting over both workers: " + ", ".join(f"{k} {v:,.0f}" for k, v in out.items()), flush=True)
    return out


def write_report(args: argparse.Namespace, rows: list[dict[str, float]], acc: dict[str, float]) -> None:
    cores = len(os.sched_getaffinity(0))
    lines = [
        "# Many workers: `slipstream serve --workers N`",
        "",
        f"Machine: {cpu_model()}, {cores} CPUs usable, Python {platform.python_version()}; load average at the "
        f"end {os.getloadavg()[0]:.1f} (shared with other work: req/s are noisy, CPU µs/request much less so).",
        f"Command: `python benchmarks/workers.py {' '.join(sys.argv[1:])}` (tiny MLP, JSON, one sample a request; "
        f"wrk -t1 on loopback, sharing the CPUs with the servers; {args.rounds} interleaved slices of "
        f"{args.duration / args.rounds:g} s per server and concurrency, medians; access log off; onnxruntime "
        "threads: each worker's share of the cores, max(1, cores // N)).",
        "",
        "| workers | c | req/s | vs 1 worker | p99 ms | errors | CPU µs/request (all processes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['workers']:.0f} | {r['c']:.0f} | {r['rps']:,.0f} | {r['ratio']:.2f}x | {r['p99']:.1f} | "
                     f"{r['errors']:.0f} | {r['cpu_us']:.0f} |")  # fmt: skip
    lines += [
        "",
        f"## Accounting: `--workers 2 --monitor-db`, wrk c = 64 for {args.monitor_seconds:g} s",
        "",
        "Summed over both workers from /metrics once nothing was pending, and counted in the SQLite log after the "
        "server stopped:",
        "",
        "| wrk requests | observed | written | dropped | lost | pending | rows in the log | exact |",
        "|---|---|---|---|---|---|---|---|",
        f"| {acc['wrk_requests']:,.0f} | {acc['observed']:,.0f} | {acc['written']:,.0f} | {acc['dropped']:,.0f} | "
        f"{acc['lost']:,.0f} | {acc['pending']:,.0f} | {acc['log_rows']:,.0f} | {'yes' if acc['exact'] else 'NO'} |",
        "",
        "(observed may exceed wrk's count by the requests in flight when wrk stopped: served, observed, but not "
        "counted by wrk.)",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers", default=None, help="Comma-separated N to compare (default: 1,2,4,8 up to the CPUs)."
    )
    parser.add_argument("--concurrency", default="8,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--duration", type=float, default=12.0, help="Seconds per server and concurrency.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved slices the duration is split into.")
    parser.add_argument("--monitor-seconds", type=float, default=20.0, help="wrk time of the accounting run.")
    parser.add_argument("--quick", action="store_true", help="6 s per server and concurrency; still 20 s monitored.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 6.0, 2
    cores = len(os.sched_getaffinity(0))
    ns = [int(x) for x in args.workers.split(",")] if args.workers else [n for n in (1, 2, 4, 8) if n <= max(2, cores)]
    print(f"CPU: {cpu_model()} ({cores} usable); command: {' '.join(sys.argv)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="slipstream-workers-bench-") as tmp:
        work = Path(tmp)
        _, bundle, body = tiny_mlp(work)
        rows = throughput(bundle, body, ns, args, work)
        acc = accounting(bundle, body, args.monitor_seconds, work)
    write_report(args, rows, acc)


if __name__ == "__main__":
    main()
