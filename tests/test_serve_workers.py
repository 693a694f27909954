"""`slipstream serve --workers 2` as a user runs it: one port, two serving processes, one monitor process.

Real subprocesses on loopback. Each request goes on a new connection, so the kernel (SO_REUSEPORT) spreads
them over both workers; the access log says which worker (pid) served each one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slipstream.serve.fleet import merge_expositions
from slipstream.serve.metrics import ServeMetrics
from tests.serve_support import add_version, free_port

ADMIN = "admin-key-for-the-workers-test"
BODY = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [0.1] * 8}]}


class Served:
    """A `slipstream serve --workers 2` subprocess, its stderr in a file (JSON lines)."""

    def __init__(self, repo: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(repo),
               "--port", str(self.port), "--workers", "2", *extra]  # fmt: skip
        env = {**os.environ, "SLIPSTREAM_ADMIN_KEYS": ADMIN}
        with log.open("wb") as sink:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink, env=env)
        self.wait_for(lambda: "with 2 workers" in self.text(), "both workers serving")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]

    def wait_for(self, done: object, what: str, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():  # type: ignore[operator]
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}) waiting for {what}:\n{self.text()}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def workers(self) -> list[int]:
        """The pids of the workers that said they serve, in order."""
        return [
            int(str(d["message"]).split("pid ")[1].split(")")[0]) for d in self.lines() if d.get("event") == "worker_up"
        ]

    def infer(self, n: int) -> list[int]:
        """``n`` requests, each on a new connection; their statuses."""
        statuses = []
        for _ in range(n):
            with httpx.Client(timeout=10) as client:
                statuses.append(client.post(f"{self.url}/v2/models/mlp/infer", json=BODY).status_code)
        return statuses

    def served_by(self) -> dict[int, int]:
        """Infer requests answered 200, by the worker pid in the access log."""
        out: dict[int, int] = {}
        for d in self.lines():
            if d.get("path") == "/v2/models/mlp/infer" and d.get("status") == 200:
                pid = int(d["worker"])  # type: ignore[call-overload]
                out[pid] = out.get(pid, 0) + 1
        return out

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("workers")
    add_version(work / "repo", "mlp", "1", work)
    return work / "repo"


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(repo, tmp_path_factory.mktemp("log") / "serve.log")
    try:
        yield server
    finally:
        server.kill()


def _requests_200(metrics: dict[str, float]) -> float:
    return metrics.get('slipstream_requests_total{model="mlp",status="200",version="1"}', 0.0)


def test_requests_are_served_by_both_workers_and_metrics_sum_exactly(served: Served) -> None:
    before = _requests_200(served.metrics())
    assert served.infer(40) == [200] * 40
    by = served.served_by()
    assert set(by) == set(served.workers()) and len(by) == 2, by  # 2^-39 odds that one worker took all 40
    metrics = served.metrics()
    assert metrics["slipstream_workers"] == 2
    assert _requests_200(metrics) - before == 40  # however the kernel spread them


def test_a_repository_unload_and_load_reach_every_worker(served: Served) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    reply = httpx.post(f"{served.url}/v2/repository/models/mlp/unload", headers=auth, timeout=30)
    assert reply.status_code == 200 and reply.headers["x-slipstream-workers"] == "2/2"
    mark = len(served.lines())
    assert set(served.infer(16)) == {503}, served.text()[-2000:]  # not ready, whichever worker takes it
    refused = {int(d["worker"]) for d in served.lines()[mark:] if d.get("status") == 503}  # type: ignore[call-overload]
    assert len(refused) == 2  # both workers unloaded it
    reply = httpx.post(f"{served.url}/v2/repository/models/mlp/load", headers=auth, timeout=60)
    assert reply.status_code == 200 and reply.headers["x-slipstream-workers"] == "2/2"
    assert served.infer(16) == [200] * 16


def test_a_killed_worker_is_restarted_and_serving_goes_on(served: Served) -> None:
    first = served.workers()
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    served.wait_for(lambda: "died after" in served.text(), "the parent to notice the death")
    assert served.infer(10) == [200] * 10  # the other worker serves meanwhile
    served.wait_for(lambda: len(served.workers()) == 3, "the restarted worker")
    new = served.workers()[-1]
    assert new not in first
    deadline = time.monotonic() + 30
    while new not in served.served_by():  # the new worker takes its share of new connections
        assert time.monotonic() < deadline
        assert served.infer(5) == [200] * 5
    down = [d for d in served.lines() if d.get("event") == "worker_down"]
    assert len(down) == 1 and "SIGKILL" in str(down[0]["message"])


def test_sigterm_drains_every_worker_and_exits_0(served: Served) -> None:
    live = served.workers()[-2:]
    assert served.stop() == 0
    drained = {d.get("worker") for d in served.lines() if "draining in-flight" in str(d.get("message"))}
    assert set(live) <= drained
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.port), timeout=1).close()
    for pid in live:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_one_monitor_process_accounts_exactly_over_both_workers(repo: Path, tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    server = Served(repo, tmp_path / "serve.log", "--monitor-db", str(db))
    try:
        assert server.infer(60) == [200] * 60
        assert len(server.served_by()) == 2
        pids = {httpx.get(f"{server.url}/v2/monitoring", timeout=10).json()["monitor_process"]["pid"] for _ in range(8)}
        assert len(pids) == 1  # both workers report the one monitor process

        def settled() -> bool:
            m = server.metrics()
            return (
                m.get("slipstream_monitor_predictions_pending") == 0
                and m.get('slipstream_monitor_predictions_total{outcome="observed",reason=""}') == 60
            )

        server.wait_for(settled, "every observed row settled")
        m = server.metrics()
        fates = {k: v for k, v in m.items() if k.startswith("slipstream_monitor_predictions_total")}
        written = fates['slipstream_monitor_predictions_total{outcome="written",reason=""}']
        dropped = sum(v for k, v in fates.items() if 'outcome="dropped"' in k)
        lost = fates['slipstream_monitor_predictions_total{outcome="lost",reason=""}']
        assert written + dropped + lost == 60 and written == 60  # 100 % sampled, nothing refused
        assert server.stop() == 0
    finally:
        server.kill()
    closed = [d for d in server.lines() if d.get("event") == "monitor_accounting"]
    assert len(closed) == 2 and {d["worker"] for d in closed} == set(server.workers())
    assert sum(int(d["observed"]) for d in closed) == 60  # type: ignore[call-overload]
    assert all(d["pending"] == 0 and d["lost"] == 0 for d in closed)
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT COALESCE(SUM(rows), 0) FROM prediction_log").fetchone()[0]
        per_link = conn.execute("SELECT SUM(written) FROM monitor_runs WHERE run LIKE '%/w%'").fetchone()[0]
    finally:
        conn.close()
    assert rows == per_link == sum(int(d["written"]) for d in closed) == 60  # type: ignore[call-overload]


def test_merged_metrics_sum_counters_and_histograms_and_keep_shared_gauges() -> None:
    a, b = ServeMetrics(), ServeMetrics()
    for metrics, n, seconds in ((a, 3, 0.001), (b, 4, 0.02)):
        for _ in range(n):
            metrics.count_request("m", "1", "200")
            metrics.model("m").total.observe(seconds)
        metrics.model_ready.labels("m", "1").set(1)
    b.model_ready.labels("m", "2").set(0)
    a.in_flight, b.in_flight = 2, 5
    lines = merge_expositions([a.render(), b.render()]).decode().splitlines()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}
    assert values['slipstream_requests_total{model="m",status="200",version="1"}'] == 7
    assert values['slipstream_request_seconds_count{model="m"}'] == 7
    assert values['slipstream_request_seconds_bucket{le="0.001",model="m"}'] == 3
    assert values['slipstream_request_seconds_sum{model="m"}'] == pytest.approx(0.083)
    assert values["slipstream_in_flight_requests"] == 7
    assert values['slipstream_model_ready{model="m",version="1"}'] == 1  # ready everywhere: 1, not 2
    assert values['slipstream_model_ready{model="m",version="2"}'] == 0


def test_a_port_another_server_holds_stops_every_worker_with_exit_1(repo: Path, tmp_path: Path) -> None:
    holder = socket.socket()  # no SO_REUSEPORT: the workers cannot share its port
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(repo), "--port", str(port),
           "--workers", "2"]  # fmt: skip
    try:
        with log.open("wb") as sink:
            code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=sink, timeout=120).returncode
    finally:
        holder.close()
    text = log.read_text()
    assert code == 1, text
    assert "cannot bind" in text and "stopped before any worker served" in text
