"""The monitor process under faults, with real processes: kill -9 under load (restarted, readiness degraded
then ok, every prediction accounted for exactly) and a full prediction log (rate-limited log, rows counted)."""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from slipstream.monitor.config import MonitorConfig
from slipstream.monitor.process.serving import ServeMonitors
from slipstream.monitor.store import StoreConfig
from slipstream.serve.settings import MonitorServing
from tests.serve_support import API_KEY, Load, ServerThread, add_version, mlp_body, monitored_settings, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    add_version(root, "mlp", "1", tmp_path_factory.mktemp("work"))
    return root


def _monitoring(client: httpx.Client) -> str:
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    state: str = r.json()["details"]["monitoring"]
    return state


def _children() -> set[int]:
    """This process's children (the server runs in a thread here: its monitor processes are ours)."""
    return {int(c) for task in Path("/proc/self/task").iterdir() for c in (task / "children").read_text().split()}


def _db_rows(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    try:
        logged = conn.execute("SELECT COALESCE(SUM(rows), 0) FROM prediction_log").fetchone()[0]
        counted = conn.execute("SELECT COALESCE(SUM(written), 0) FROM monitor_runs").fetchone()[0]
    finally:
        conn.close()
    return int(logged), int(counted)


def test_kill_9_under_load_restarts_the_monitor_and_every_prediction_is_accounted_for(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "m.db"
    caplog.set_level(logging.INFO, logger="slipstream.serve")
    with (
        ServerThread(repo, monitored_settings(db, restart_initial_s=0.5)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        monitors = server.app.monitors
        assert isinstance(monitors, ServeMonitors) and monitors.process is not None
        sup = monitors.process
        assert _monitoring(client) == "ok"
        wait_for(lambda: sup.standby == "warm")  # the spare the server keeps, imports done
        spares = _children() - {sup.process.pid}
        with Load(server.url) as load:
            wait_for(lambda: sup.totals()["written"] > 50)  # the log is being written under load
            first = sup.process.pid
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: _monitoring(client) == "degraded")
            seen_down = load.rows_ok
            wait_for(lambda: load.rows_ok > seen_down + 10)  # served while monitoring was down
            down_metrics = client.get("/metrics").text
        wait_for(lambda: _monitoring(client) == "ok")  # (without load: the test is about the books, not speed)
        with Load(server.url) as again:
            wait_for(lambda: again.rows_ok > 50)  # and monitored again
        assert load.failed == again.failed == 0 and "slipstream_monitor_process_up 0.0" in down_metrics
        assert sup.restarts == 1 and sup.process.pid in spares  # the spare took over
        wait_for(lambda: sup.standby == "warm")  # and a new spare is ready for the next death
        metrics = client.get("/metrics").text
        assert "slipstream_monitor_process_up 1.0" in metrics
        assert "slipstream_monitor_restarts_total 1.0" in metrics

        t = monitors.flush()
        assert t["pending"] == 0
        assert t["observed"] == load.rows_ok + again.rows_ok  # every row served was observed ...
        assert t["observed"] == t["written"] + sum(t["dropped"].values()) + t["lost"]  # ... and settled once
        assert t["lost"] > 0 and t["written"] > 0
        # "written" is what the log holds, to the row, including what the killed run committed unacknowledged.
        assert _db_rows(db) == (t["written"], t["written"])
        lost = re.search(r'^slipstream_monitor_predictions_total\{outcome="lost",reason=""\} (\S+)$', metrics, re.M)
        assert lost is not None and float(lost[1]) == t["lost"]
        doc = client.get("/v2/monitoring").json()["monitor_process"]
        assert doc["state"] == "ok" and doc["restarts"] == 1 and "SIGKILL" in doc["last_exit"]
        assert doc["predictions"]["lost"] == t["lost"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("died: it was killed by SIGKILL (exit code -9)" in m and f"pid {first}" in m for m in messages)
    assert any("monitor process restarted" in m and "restart 1" in m for m in messages)


def test_a_monitor_process_down_for_long_is_counted_and_said_so(repo: Path, tmp_path: Path) -> None:
    """While it is down (here: a long backoff) serving goes on, feedback and fresh evaluations are 503, and
    every observed row is counted lost; closing the server settles the books."""
    with (
        ServerThread(repo, monitored_settings(tmp_path / "m.db", restart_initial_s=600)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        monitors = server.app.monitors
        assert monitors is not None and monitors.process is not None
        sup = monitors.process
        assert client.post("/v2/models/mlp/infer", json=mlp_body(1, 0)).status_code == 200
        assert client.get("/v2/models/mlp/monitoring", params={"evaluate": "true"}).json()["requests"] == 1
        sup.process.kill()
        wait_for(lambda: not sup.alive)
        assert "killed by SIGKILL" in str(sup.exit_reason) and _monitoring(client) == "degraded"
        assert [client.post("/v2/models/mlp/infer", json=mlp_body(2, i)).status_code for i in range(5)] == [200] * 5
        t = monitors.flush()
        assert t["observed"] == 11 and t["pending"] == 0 and t["lost"] >= 10
        assert t["written"] + sum(t["dropped"].values()) + t["lost"] == 11
        assert f"slipstream_monitor_requests_lost_total {float(t['lost'])}" in client.get("/metrics").text
        fresh = client.get("/v2/models/mlp/monitoring", params={"evaluate": "true"})
        assert fresh.status_code == 503 and "monitor process is not running" in fresh.json()["error"]
        assert client.post("/v2/models/mlp/feedback", json={"id": "x", "label": 0}).status_code == 503
        stale = client.get("/v2/models/mlp/monitoring").json()  # the last evaluation, marked stale
        assert stale["requests"] == 1 and "stale" in stale["notes"][-1]
        assert stale["monitor_process"]["state"] == "degraded"


def test_a_full_prediction_log_is_logged_once_counted_and_serving_goes_on(
    repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite's max_page_count (the log's size cap) fails writes with the very error of a full disk."""
    db = tmp_path / "m.db"
    caplog.set_level(logging.INFO)
    with (
        ServerThread(repo, monitored_settings(db, log_max_mb=0.06)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        monitors = server.app.monitors
        assert monitors is not None
        statuses = []
        for wave in range(6):  # each wave is written (and fails) in its own transaction
            statuses += [
                client.post("/v2/models/mlp/infer", json=mlp_body(64, 100 * wave + i)).status_code for i in range(8)
            ]
            t = monitors.flush()
        assert statuses == [200] * 48 and _monitoring(client) == "ok"
        assert t["pending"] == 0 and t["observed"] == 48 * 64
        assert t["observed"] == t["written"] + sum(t["dropped"].values()) + t["lost"]
        assert t["dropped"]["disk_full"] >= 3 * 8 * 64 and t["lost"] == 0
        assert _db_rows(db) == (t["written"], t["written"])
    full = [r for r in caplog.records if "database or disk is full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.WARNING, [r.getMessage() for r in full]


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    s = MonitorServing(restart_initial_s=0.5, restart_max_s=3.0)
    assert [s.restart_backoff_s(n) for n in (1, 2, 3, 4, 100)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_the_monitor_process_settles_every_row_once_sampled_refused_or_written(repo: Path, tmp_path: Path) -> None:
    """The worker itself, in this process on a real socket pair and a real log: each row of each batch ends in
    exactly one count, and the log's own count (monitor_runs) is the rows it holds."""
    import socket
    from multiprocessing.connection import Connection

    from slipstream.monitor.ingest import Pending, columns
    from slipstream.monitor.process.worker import Worker

    mine, theirs = socket.socketpair()
    server_end = Connection(mine.detach())
    settings = MonitorServing(
        store=StoreConfig(path=tmp_path / "m.db"), config=MonitorConfig(sample_rate=0.5, evaluate_interval_s=3600)
    )
    ServeMonitors(settings)  # prepares the log, as the server does
    worker = Worker(Connection(theirs.detach()), settings, run="run-1")
    try:
        worker.handle(("attach", 1, ("mlp", "1"), str(repo / "mlp" / "1"), None))
        rng = np.random.default_rng(0)

        def pending(i: int, rows: int, width: int = 8) -> Pending:
            x = rng.normal(size=(rows, width)).astype(np.float32)
            return Pending(f"r{i}", time.time(), {"pixels": x}, {"p": x[:, :4]}, 0.001, None, None, None)

        good, _ = columns([pending(i, 1 + i % 4) for i in range(200)])  # 500 rows
        worker.handle(("batch", ("mlp", "1"), good, {"security": {}, "dropped": 0, "screen_errors": 0, "errors": 0}))
        odd = columns([pending(900, 3)])[0]
        odd[0].counts[:] = 5  # claims 5 rows, holds 3: the ingestor refuses the batch
        worker.handle(("batch", ("mlp", "1"), odd, {"security": {}, "dropped": 0, "screen_errors": 0, "errors": 0}))
        worker.handle(("batch", ("mlp", "2"), good, {"security": {}, "dropped": 0, "screen_errors": 0, "errors": 0}))
        written, dropped = worker._flush()
    finally:
        worker._close()
        server_end.close()
    assert dropped["ingest_error"] == 5 and dropped["no_monitor"] == 500
    assert 150 < written < 350 and written + dropped["not_sampled"] == 500  # 50 % sampled, the rest counted
    assert sum(dropped.values()) == 5 + 500 + dropped["not_sampled"]  # nothing else dropped
    assert _db_rows(tmp_path / "m.db") == (written, written)


def test_one_monitor_process_shared_by_two_servers_settles_each_exactly_across_a_kill_9(
    repo: Path, tmp_path: Path
) -> None:
    """serve --workers N's monitoring, with real processes: one monitor process listening on a Unix socket (its
    parent's Supervisor restarts it), two servers' links to it. Each server's rows are counted apart, in the
    log itself; killed with -9, the process is restarted, both links connect again, and the books of each
    server still close exactly: observed = written + dropped + lost, written = the rows in the log."""
    from slipstream.monitor.process.proxy import RemoteMonitor
    from slipstream.monitor.process.shared import SharedMonitor
    from slipstream.monitor.process.supervisor import Supervisor

    settings = MonitorServing(
        store=StoreConfig(path=tmp_path / "m.db"),
        config=MonitorConfig(evaluate_interval_s=3600),
        restart_initial_s=0.1,
        standby=False,
    )
    ServeMonitors(settings)  # prepares the log, as the workers' parent does
    parent = Supervisor(settings, listen=str(tmp_path / "monitor.sock"))
    links = [SharedMonitor(settings, address=str(tmp_path / "monitor.sock"), worker=w) for w in ("w0", "w1")]
    key = ("mlp", "1")
    remotes = []
    for link in links:
        link.attach(key, str(repo / "mlp" / "1"), None)
        remotes.append(RemoteMonitor(link, *key, None, settings.config))
    rng = np.random.default_rng(0)
    sent = [0, 0]

    def traffic(rounds: int) -> None:
        for _ in range(rounds):
            for i, remote in enumerate(remotes):
                rows = 1 + i  # server 0 sends 1-row requests, server 1 2-row ones: the books must not mix
                x = rng.normal(size=(rows, 8)).astype(np.float32)
                remote.observe(f"r{sent[i]}", {"pixels": x}, {"p": x[:, :4]}, latency_s=0.001)
                sent[i] += rows
                remote.ship()

    try:
        traffic(50)
        for link in links:
            link.call("flush")
            assert link.totals()["pending"] == 0
        assert [link.totals()["written"] for link in links] == [50, 100]
        os.kill(parent.process.pid, signal.SIGKILL)
        traffic(20)  # some of it while the process is down: lost, and counted so
        deadline = time.monotonic() + 60
        while not (parent.restarts and parent.alive and all(link.restarts and link.alive for link in links)):
            assert time.monotonic() < deadline, "the links did not connect to the restarted process"
            traffic(1)
            time.sleep(0.05)
        assert parent.restarts == 1 and all(link.restarts == 1 for link in links)
        traffic(30)
        for link in links:
            link.call("flush")
    finally:
        for link in links:
            link.close()
        parent.close()
    totals = [link.totals() for link in links]
    for t, observed in zip(totals, sent, strict=True):
        assert t["observed"] == observed and t["pending"] == 0
        assert t["written"] + sum(t["dropped"].values()) + t["lost"] == observed
    assert totals[0]["written"] >= 80 and totals[1]["written"] >= 160  # only what came while it was down is lost
    logged, counted = _db_rows(tmp_path / "m.db")
    assert logged == counted == totals[0]["written"] + totals[1]["written"]
