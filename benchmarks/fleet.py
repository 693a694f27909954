"""Issue 21: three replicas on one PostgreSQL prediction log, a database restart under load, and what it costs.

1. Fleet: three `slipstream serve --monitor-db postgresql://…` processes (the digits MLP with its profile,
   as benchmarks/monitoring.py builds it) share one throwaway PostgreSQL cluster (tests/pg_support.py). Three
   wrk processes at once, c = 16 each, one per replica, replay in-distribution digits for the duration. Then a
   Python client sends labelled traffic with request ids to random replicas and POSTs every label to another
   random replica; then shifted (noisy) digits. Checked: the rows in PostgreSQL equal the rows the replicas
   observed (their own accounting from /metrics, once settled); every label joins its prediction (in SQL: the
   log's request ids against the feedback table); each drift rule fires once in the fleet's alert state
   (fleet_alert_events), and a local webhook receiver gets each firing once, not once per replica.
2. Restart: the same three replicas on a fresh database under the same wrk load; PostgreSQL is restarted
   (fast stop, 1.5 s down) a third of the way in. wrk errors and non-2xx must stay 0, and each replica's
   accounting must close exactly: observed = written + dropped (+ lost, pending), rows in PostgreSQL = written.
3. Speed: the store's write throughput in-process (PostgresStore vs SQLiteStore, the same batches), and the
   serving throughput with the PostgreSQL log vs the SQLite log vs no log, interleaved rounds, medians and
   the spread (min–max) over rounds. A ratio is "unstable" when its spread is wider than its effect.

    .venv/bin/python benchmarks/fleet.py            # the issue's 60 s fleet run; about 6 minutes in all
    .venv/bin/python benchmarks/fleet.py --quick    # short runs; about 3 minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from monitoring import body, build, serve_cmd  # noqa: E402
from serving import ROOT, free_port, start, stop, tree_cpu_seconds, wrk_script  # noqa: E402

from slipstream.monitor import SQLiteStore, StoreConfig  # noqa: E402
from slipstream.monitor.records import PredictionBatch  # noqa: E402
from slipstream.monitor.store_pg import PostgresLogReader, PostgresStore  # noqa: E402
from slipstream.runtime.targets import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fleet.md"
DRIFT_RULES = ("input_drift", "multivariate_drift", "prediction_drift")
REPLICAS = 3


def _pg_support() -> Any:
    """tests/pg_support.py, imported by path (the benchmark does not make tests/ a package it depends on)."""
    spec = importlib.util.spec_from_file_location("pg_support", ROOT / "tests" / "pg_support.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_database(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return dsn.rsplit("/", 1)[0] + "/" + name


def sql(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query).fetchall()


# -- load ----------------------------------------------------------------------------------------
def wrk_rotating(work: Path, x: np.ndarray, rows: int = 400) -> Path:
    """A wrk script that cycles through ``rows`` distinct digits: one repeated body would read as drift."""
    bodies = [json.dumps(body(x[i % len(x)])) for i in range(rows)]
    script = work / "rotate.lua"
    script.write_text(
        "local bodies = {" + ",".join(json.dumps(b) for b in bodies) + "}\nlocal i = 0\n"
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        "request = function()\n  i = i % #bodies + 1\n  return wrk.format(nil, nil, nil, bodies[i])\nend\n"
    )
    return script


def wrk_all(urls: list[str], script: Path, c: int, seconds: float) -> list[dict[str, float]]:
    """One wrk per replica, all at once."""
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(lambda u: wrk_script(f"{u}/v2/models/digits/infer", script, c, seconds), urls))


class WebhookReceiver:
    """A local HTTP endpoint that keeps every alert POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append(doc.get("alert", doc))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


# -- accounting ----------------------------------------------------------------------------------
def fates(url: str) -> dict[str, float]:
    """A replica's own accounting of observed rows, from /metrics: observed, written, dropped, lost, pending."""
    out = dict.fromkeys(("observed", "written", "dropped", "lost", "pending"), 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = re.match(r'slipstream_monitor_predictions_total\{outcome="(\w+)",reason="[^"]*"\} (\S+)', line)
        if m:
            out[m.group(1)] += float(m.group(2))
        elif line.startswith("slipstream_monitor_predictions_pending "):
            out["pending"] = float(line.split()[1])
    return out


def settled(urls: list[str], timeout_s: float = 90.0) -> list[dict[str, float]]:
    """Every replica's accounting once nothing is pending any more (the writers caught up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = [fates(u) for u in urls]
        if all(g["pending"] == 0 for g in got) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def start_replicas(bundle: Path, db: str, *extra: str) -> tuple[list[Any], list[str]]:
    ports = [free_port() for _ in range(REPLICAS)]
    cmds = [serve_cmd(bundle, p, "--monitor-db", db, *extra) for p in ports]
    with ThreadPoolExecutor(REPLICAS) as pool:  # start together: they migrate the schema under its lock
        procs = list(pool.map(lambda a: start(a[0], a[1], "digits"), zip(cmds, ports, strict=True)))
    return procs, [f"http://127.0.0.1:{p}" for p in ports]


# -- 1. three replicas on one database ----------------------------------------------------------
def fleet(bundle: Path, x: np.ndarray, y: np.ndarray, dsn: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    db = new_database(dsn, "fleet")
    hook = WebhookReceiver()
    procs, urls = start_replicas(bundle, db, "--monitor-interval", "2", "--webhook", hook.url)
    rng = random.Random(0)
    out: dict[str, Any] = {}
    try:
        script = wrk_rotating(work, x)
        out["wrk"] = wrk_all(urls, script, 16, args.fleet_s)
        print(f"fleet: wrk {[int(r['total']) for r in out['wrk']]} requests, errors "
              f"{[int(r['errors']) for r in out['wrk']]}", flush=True)  # fmt: skip
        clients = [httpx.Client(base_url=u, timeout=60) for u in urls]
        ids, statuses = [], {}
        for i in range(args.labeled):
            rid = f"lab-{i}"
            code = rng.choice(clients).post("/v2/models/digits/infer", json=body(x[i % len(x)], rid)).status_code
            statuses[code] = statuses.get(code, 0) + 1
            ids.append(rid)
        fb_codes: dict[int, int] = {}
        for lo in range(0, len(ids), 50):
            doc = {"labels": [{"id": r, "label": int(y[i % len(y)])} for i, r in enumerate(ids[lo : lo + 50], lo)]}
            code = rng.choice(clients).post("/v2/models/digits/feedback", json=doc).status_code
            fb_codes[code] = fb_codes.get(code, 0) + 1
        out["labeled_statuses"], out["feedback_statuses"] = statuses, fb_codes
        print(f"fleet: {len(ids)} labelled requests {statuses}, feedback posts {fb_codes}", flush=True)
        noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.4, x.shape), 0, 1).astype(np.float32)
        shift_started = time.time()
        for i in range(args.shifted):
            rng.choice(clients).post("/v2/models/digits/infer", json=body(noisy[i % len(noisy)]))
        deadline = time.monotonic() + args.alert_wait_s
        fired: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline:
            fired = sql(db, "SELECT rule, COUNT(*) FROM fleet_alert_events WHERE state = 'firing' GROUP BY rule")
            if {r for r, _ in fired} >= set(DRIFT_RULES):
                break
            time.sleep(1)
        time.sleep(6)  # three more evaluation ticks: a replica that would fire again has had its chance
        out["shift_to_alert_s"] = time.time() - shift_started
        for c in clients:
            c.close()
        out["accounting"] = settled(urls)
        monitoring = [httpx.get(f"{u}/v2/models/digits/monitoring", timeout=60).json() for u in urls]
        out["alerts_seen"] = [sorted(a["rule"] for a in m["alerts"] if a["state"] == "firing") for m in monitoring]
        out["quality"] = [(m.get("quality") or {}).get("labeled") for m in monitoring]
    finally:
        for p in procs:
            stop(p)
        hook.close()
    out["events"] = sql(db, "SELECT rule, state, COUNT(*), COUNT(DISTINCT evaluator) FROM fleet_alert_events "
                            "GROUP BY rule, state ORDER BY rule, state")  # fmt: skip
    out["webhook"] = {}
    for a in hook.received:
        key = (a["rule"], a["state"])
        out["webhook"][key] = out["webhook"].get(key, 0) + 1
    out["db_rows"] = int(sql(db, "SELECT COALESCE(SUM(rows), 0) FROM prediction_log")[0][0])
    reader = PostgresLogReader(db)
    try:
        logged = {rid for b in reader.batches() for rid in b.request_ids if rid.startswith("lab-")}
    finally:
        reader.close()
    joined = sql(db, "SELECT request_id FROM feedback WHERE request_id LIKE 'lab-%'")
    out["labels"] = len(ids)
    out["joined"] = len(logged & {r for (r,) in joined} & set(ids))
    out["shift_rule_fires"] = dict(fired)
    return out


# -- 2. a database restart under load -----------------------------------------------------------
def restart(bundle: Path, x: np.ndarray, cluster: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    db = new_database(cluster.dsn, "restart")
    procs, urls = start_replicas(bundle, db, "--monitor-interval", "5")
    out: dict[str, Any] = {}
    try:
        script = wrk_rotating(work, x)
        with ThreadPoolExecutor(1) as pool:
            load = pool.submit(wrk_all, urls, script, 16, args.restart_s)
            time.sleep(args.restart_s / 3)
            t0 = time.perf_counter()
            cluster.restart(down_s=1.5)
            out["restart_s"] = time.perf_counter() - t0
            out["wrk"] = load.result()
        out["accounting"] = settled(urls)
    finally:
        for p in procs:
            stop(p)
    out["db_rows"] = int(sql(db, "SELECT COALESCE(SUM(rows), 0) FROM prediction_log")[0][0])
    return out


# -- 3. speed ------------------------------------------------------------------------------------
def batches(n_batches: int, rows: int) -> list[PredictionBatch]:
    rng = np.random.default_rng(0)
    out = []
    for b in range(n_batches):
        probs = rng.dirichlet(np.ones(10), rows).astype(np.float32)
        out.append(PredictionBatch(
            model="digits", version="1", request_ids=[f"b{b}-{i}" for i in range(rows)],
            ts=time.time() + np.arange(rows) * 1e-4, latency_ms=rng.uniform(0.2, 2, rows), groups=["a"] * rows,
            key_ids=[None] * rows, prediction=probs.argmax(1).astype(np.float64),
            confidence=probs.max(1).astype(np.float64),
            input_stats={f"pixels.{s}": rng.random(rows) for s in ("mean", "std", "min", "max")},
            outputs={"probabilities": probs},
        ))  # fmt: skip
    return out


def store_speed(dsn: str, work: Path, n_batches: int, rows: int, rounds: int) -> dict[str, list[float]]:
    """Rows/s from the first put_batch to the flush that wrote the last, per store, interleaved rounds."""
    data = batches(n_batches, rows)
    url = new_database(dsn, "speed")
    out: dict[str, list[float]] = {"PostgreSQL": [], "SQLite": []}
    for r in range(rounds):
        for name in out if r % 2 == 0 else reversed(list(out)):
            config = StoreConfig(url=url) if name == "PostgreSQL" else StoreConfig(path=work / f"speed-{r}.db")
            store = PostgresStore(config) if name == "PostgreSQL" else SQLiteStore(config)
            try:
                t0 = time.perf_counter()
                for b in data:
                    store.put_batch(b)
                if not store.flush(timeout_s=120):
                    raise RuntimeError(f"{name} did not write {n_batches} batches in 120 s")
                out[name].append(n_batches * rows / (time.perf_counter() - t0))
            finally:
                store.close()
    return out


def serving_speed(bundle: Path, x: np.ndarray, dsn: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    url = new_database(dsn, "serving")
    servers = {
        "no log": serve_cmd(bundle, free_port()),
        "SQLite log": serve_cmd(bundle, free_port(), "--monitor-db", str(work / "serving.db")),
        "PostgreSQL log": serve_cmd(bundle, free_port(), "--monitor-db", url),
    }
    procs: dict[str, tuple[Any, str]] = {}
    script = wrk_rotating(work, x)
    samples: dict[int, dict[str, list[dict[str, float]]]] = {}
    try:
        for name, cmd in servers.items():
            port = int(cmd[cmd.index("--port") + 1])
            procs[name] = (start(cmd, port, "digits"), f"http://127.0.0.1:{port}/v2/models/digits/infer")
            wrk_script(procs[name][1], script, 8, 2)  # warm-up
        names = list(procs)
        for c in args.concurrency:
            samples[c] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    proc, u = procs[name]
                    cpu0 = sum(tree_cpu_seconds(proc.pid))
                    got = wrk_script(u, script, c, args.slice_s)
                    got["cpu_us"] = 1e6 * (sum(tree_cpu_seconds(proc.pid)) - cpu0) / max(got["total"], 1)
                    samples[c][name].append(got)
    finally:
        for proc, _ in procs.values():
            stop(proc)
    return samples


# -- report --------------------------------------------------------------------------------------
def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def ratio_cell(ratios: list[float]) -> str:
    med, lo, hi = statistics.median(ratios), min(ratios), max(ratios)
    unstable = (hi - lo) > abs(med - 1.0)
    return f"{med:.2f} ({lo:.2f}–{hi:.2f}){' unstable' if unstable else ''}"


def report(args: argparse.Namespace, f: dict[str, Any], rs: dict[str, Any], st: dict[str, list[float]],
           sv: dict[int, dict[str, list[dict[str, float]]]]) -> list[str]:  # fmt: skip
    acc, racc = f["accounting"], rs["accounting"]
    observed = sum(a["observed"] for a in acc)
    wrk_errors = sum(int(r["errors"]) for r in rs["wrk"])
    lines = [
        "# Fleet: three replicas on one PostgreSQL log, a database restart under load, and what it costs",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores ({platform.machine()}), Python "
        f"{platform.python_version()}, PostgreSQL {f['pg_version']} (a throwaway cluster on loopback, fsync off); "
        "shared with other jobs, so absolute numbers vary run to run.",
        f"Command: `{args.command}`",
        "",
        f"## Three replicas on one database ({args.fleet_s:g} s of wrk, c = 16 per replica, then "
        f"{args.labeled} labelled and {args.shifted} shifted requests)",
        "",
        "| replica | wrk requests | wrk errors | observed | written | dropped | lost | pending |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (w, a) in enumerate(zip(f["wrk"], acc, strict=True)):
        counts = " | ".join(f"{a[k]:,.0f}" for k in ("observed", "written", "dropped", "lost", "pending"))
        lines.append(f"| {i + 1} | {int(w['total']):,} | {int(w['errors'])} | {counts} |")
    lines += [
        "",
        f"- Rows in PostgreSQL: **{f['db_rows']:,}**; rows the replicas observed, summed: **{observed:,.0f}** "
        f"({'equal' if f['db_rows'] == observed else 'NOT equal'}). "
        f"wrk counted {sum(int(w['total']) for w in f['wrk']):,} "
        "answers (it does not count the ones in flight when it stops), plus the Python client's "
        f"{args.labeled + args.shifted:,}.",
        f"- Labels: {f['labels']:,} requests with ids sent to random replicas, their labels POSTed to random replicas "
        f"in batches of 50 (statuses {f['feedback_statuses']}); **{f['joined']:,} of {f['labels']:,} "
        f"({100 * f['joined'] / max(f['labels'], 1):.1f} %) join** (the log's request ids against the feedback "
        f"table, in SQL). Labelled rows in each replica's quality window: {f['quality']}.",
        f"- After the shift, firing transitions per rule in the fleet's state (fleet_alert_events): "
        f"{f['shift_rule_fires'] or 'none'}; waited {f['shift_to_alert_s']:.0f} s from the first shifted request.",
        "",
        "| rule | state | events in fleet_alert_events | recorded by replicas | webhook POSTs received |",
        "|---|---|---|---|---|",
    ]
    for rule, state, n, by in f["events"]:
        lines.append(f"| {rule} | {state} | {n} | {by} | {f['webhook'].get((rule, state), 0)} |")
    lines += [
        "",
        f"Firing alerts each replica's /v2/models/digits/monitoring shows: {f['alerts_seen']}.",
        "",
        f"## A PostgreSQL restart under load ({args.restart_s:g} s of wrk, c = 16 per replica; fast stop, 1.5 s "
        f"down, start: {rs['restart_s']:.1f} s in all, a third of the way in)",
        "",
        "| replica | wrk requests | wrk errors + non-2xx | observed | written | dropped | lost | pending | exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (w, a) in enumerate(zip(rs["wrk"], racc, strict=True)):
        exact = a["observed"] == a["written"] + a["dropped"] + a["lost"] + a["pending"]
        lines.append(f"| {i + 1} | {int(w['total']):,} | {int(w['errors'])} | {a['observed']:,.0f} | "
                     f"{a['written']:,.0f} | {a['dropped']:,.0f} | {a['lost']:,.0f} | {a['pending']:,.0f} | "
                     f"{'yes' if exact else 'NO'} |")  # fmt: skip
    written = sum(a["written"] for a in racc)
    lines += [
        "",
        f"- Serving errors: **{wrk_errors}**. Rows in PostgreSQL afterwards: **{rs['db_rows']:,}**; written, "
        f"summed over the replicas: **{written:,.0f}** ({'equal' if rs['db_rows'] == written else 'NOT equal'}).",
        "",
        f"## Speed: the store's writes, in-process ({args.store_batches} batches of {args.store_rows} rows, "
        f"{args.store_rounds} interleaved rounds)",
        "",
        "| store | rows/s, median (min–max) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {spread(v)} |" for name, v in st.items()]
    pg_sq = [p / s for p, s in zip(st["PostgreSQL"], st["SQLite"], strict=True)]
    lines += [
        "",
        f"PostgreSQL / SQLite, paired by round: {ratio_cell(pg_sq)}.",
        "",
        f"## Speed: serving with the PostgreSQL log vs the SQLite log vs no log ({args.rounds} interleaved rounds "
        f"of {args.slice_s} s per server, wrk on loopback, one replica each)",
        "",
        "| concurrency | server | req/s, median (min–max) | vs no log, paired by round | p99 ms | CPU µs/req "
        "| errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, per in sv.items():
        base = [g["rps"] for g in per["no log"]]
        for name, got in per.items():
            rps = [g["rps"] for g in got]
            ratio = "–" if name == "no log" else ratio_cell([a / b for a, b in zip(rps, base, strict=True)])
            p99 = statistics.median(g["p99"] for g in got)
            cpu = statistics.median(g["cpu_us"] for g in got)
            errors = sum(int(g["errors"]) for g in got)
            lines.append(f"| {c} | {name} | {spread(rps)} | {ratio} | {p99:.2f} | {cpu:.0f} | {errors} |")
    lines += [
        "",
        "A ratio is marked unstable when its min–max over the rounds is wider than its distance from 1: the rounds "
        "disagree more than the variants differ. CPU per request counts the server and its monitor process.",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleet-s", type=float, default=60.0, help="Seconds of wrk on the three replicas.")
    ap.add_argument("--labeled", type=int, default=2000, help="Requests sent with ids, then labelled.")
    ap.add_argument("--shifted", type=int, default=2000, help="Shifted requests after the labelled ones.")
    ap.add_argument("--alert-wait-s", type=float, default=60.0, help="Longest wait for the drift alerts.")
    ap.add_argument("--restart-s", type=float, default=30.0, help="Seconds of wrk around the database restart.")
    ap.add_argument("--store-batches", type=int, default=400, help="Batches per store in the write benchmark.")
    ap.add_argument("--store-rows", type=int, default=250, help="Rows per batch (one 50 ms batch at 5,000 req/s).")
    ap.add_argument("--store-rounds", type=int, default=4)
    ap.add_argument("--concurrency", default="16,64", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--rounds", type=int, default=6, help="Interleaved rounds per server and concurrency.")
    ap.add_argument("--slice-s", type=int, default=3, help="Seconds of wrk per server and round.")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="Short runs (about 3 minutes); overrides the sizes above.")
    args = ap.parse_args()
    args.command = " ".join([".venv/bin/python", "benchmarks/fleet.py", *sys.argv[1:]])
    if args.quick:
        args.fleet_s, args.labeled, args.shifted, args.alert_wait_s, args.restart_s = 15.0, 500, 1200, 30.0, 12.0
        args.store_batches, args.store_rounds, args.concurrency, args.rounds, args.slice_s = 100, 2, [16], 3, 2
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores", flush=True)
    print(f"command: {args.command}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="slipstream-fleet-"))
    work.chmod(0o755)
    cluster = _pg_support().PostgresCluster()
    try:
        bundle, x, y = build(work)
        cluster.start()
        print(f"PostgreSQL at {cluster.dsn}", flush=True)
        f = fleet(bundle, x, y, cluster.dsn, args, work)
        f["pg_version"] = sql(cluster.dsn, "SHOW server_version")[0][0]
        print({k: v for k, v in f.items() if k != "wrk"}, flush=True)
        rs = restart(bundle, x, cluster, args, work)
        print(rs, flush=True)
        st = store_speed(cluster.dsn, work, args.store_batches, args.store_rows, args.store_rounds)
        print({k: [round(v) for v in vs] for k, vs in st.items()}, flush=True)
        sv = serving_speed(bundle, x, cluster.dsn, args, work)
        for c, per in sv.items():
            for name, got in per.items():
                print(f"c={c} {name:15} req/s {[round(g['rps']) for g in got]} errors "
                      f"{sum(int(g['errors']) for g in got)}", flush=True)  # fmt: skip
        lines = report(args, f, rs, st, sv)
        args.out.write_text("\n".join(lines))
        print("\n".join(lines))
        print(f"wrote {args.out}")
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
