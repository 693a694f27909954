"""A real server logging to a real PostgreSQL (the ``postgres_cluster`` fixture), and the CLI's --monitor-db.

Under load, the fixture restarts PostgreSQL: serving must not fail once, and afterwards every row the server
observed is written or dropped (by reason), exactly, and the database holds exactly the rows counted written.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from slipstream.cli.app import app
from slipstream.monitor.process.serving import ServeMonitors
from slipstream.serve.server import settings_from_options
from slipstream.serve.settings import ServeSettings
from tests.pg_support import PostgresCluster
from tests.serve_support import API_KEY, Load, ServerThread, add_version, mlp_body, wait_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    add_version(root, "mlp", "1", tmp_path_factory.mktemp("work"))
    return root


@pytest.fixture
def pg_url(postgres_dsn: str) -> Iterator[str]:
    name = f"serve_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _settings(db: str, **store: Any) -> ServeSettings:
    """What `slipstream serve --monitor-db DB` makes of its options (the CLI's own translation)."""
    options = {
        "port": 0,
        "access_log": False,
        "monitor": {"store": {"path": db, **store}, "config": {"evaluate_interval_s": 3600}, "standby": False},
    }
    return settings_from_options(options, {"SLIPSTREAM_API_KEYS": API_KEY})


def _db_rows(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        logged = conn.execute("SELECT COALESCE(SUM(rows), 0) FROM prediction_log").fetchone()
        counted = conn.execute("SELECT COALESCE(SUM(written), 0) FROM monitor_runs").fetchone()
    assert logged is not None and counted is not None
    return int(logged[0]), int(counted[0])


def test_a_postgres_restart_under_load_loses_nothing_and_stops_no_request(
    repo: Path, pg_url: str, postgres_cluster: PostgresCluster
) -> None:
    with (
        ServerThread(repo, _settings(pg_url, flush_interval_s=0.05)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        monitors = server.app.monitors
        assert isinstance(monitors, ServeMonitors) and monitors.process is not None
        sup = monitors.process
        with Load(server.url) as load:
            wait_for(lambda: sup.totals()["written"] > 50)  # the database is being written under load
            before = load.rows_ok
            postgres_cluster.restart(down_s=1.5)  # every connection is cut; the server keeps serving
            wait_for(lambda: load.rows_ok > before + 50)
            served_while_restarting = load.rows_ok - before
            after = sup.totals()["written"]
            wait_for(lambda: sup.totals()["written"] > after + 50)  # and writes again after reconnecting
        assert load.failed == 0 and served_while_restarting > 50
        assert client.get("/v2/health/ready").json()["ready"] is True
        t = monitors.flush()
        assert t["pending"] == 0 and t["lost"] == 0
        assert t["observed"] == load.rows_ok  # every row served was observed ...
        assert t["observed"] == t["written"] + sum(t["dropped"].values())  # ... and settled once, exactly
        assert _db_rows(pg_url) == (t["written"], t["written"])  # the database holds exactly what was counted


def test_feedback_through_the_server_lands_in_postgres_and_joins(repo: Path, pg_url: str) -> None:
    with (
        ServerThread(repo, _settings(pg_url)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        r = client.post("/v2/models/mlp/infer", json={**mlp_body(1, 7), "id": "req-7"})
        assert r.status_code == 200
        assert client.post("/v2/models/mlp/feedback", json={"id": "req-7", "label": 1}).status_code in (200, 202)
        monitors = server.app.monitors
        assert monitors is not None
        assert monitors.flush()["written"] == 1
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT request_id, label FROM feedback").fetchall() == [("req-7", 1.0)]


def test_the_cli_refuses_an_unknown_scheme_and_makes_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--monitor-db", "mysql://app@db/log"])
    assert result.exit_code != 0 and "postgresql:// URL" in result.output
    result = CliRunner().invoke(
        app, ["serve", str(tmp_path), "--monitor-db", "postgresql://postgres@127.0.0.1:1/x?connect_timeout=1"]
    )
    assert result.exit_code != 0 and "Cannot reach the prediction log's database" in result.output
    assert list(tmp_path.iterdir()) == []  # no 'postgresql:' directory, no SQLite file named after the URL


def test_monitor_status_report_and_export_read_postgres(repo: Path, pg_url: str, tmp_path: Path) -> None:
    with (
        ServerThread(repo, _settings(pg_url)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        for i in range(6):
            assert client.post("/v2/models/mlp/infer", json={**mlp_body(1, i), "id": f"q{i}"}).status_code == 200
        fb = client.post("/v2/models/mlp/feedback", json={"id": "q0", "label": 0})
        assert fb.status_code in (200, 202), fb.text
        assert server.app.monitors is not None
        server.app.monitors.flush()
    runner = CliRunner()
    status = runner.invoke(app, ["monitor", "status", "--db", pg_url, "--json"])
    assert status.exit_code == 0, status.output
    summary = json.loads(status.output)
    assert (summary["predictions"], summary["models"]) == (6, ["mlp:1"]) and summary["path"] == pg_url
    html = tmp_path / "report.html"
    report = runner.invoke(app, ["monitor", "report", "--db", pg_url, "-o", str(html)])
    assert report.exit_code == 0, report.output
    assert "<svg" in html.read_text() and pg_url in html.read_text()
    out = tmp_path / "rows.jsonl"
    export = runner.invoke(app, ["monitor", "export", "--db", pg_url, "-o", str(out)])
    assert export.exit_code == 0, export.output
    lines = out.read_text().splitlines()
    labels = {doc["request_id"]: doc["label"] for doc in map(json.loads, lines)}
    assert labels == {"q0": 0.0, **{f"q{i}": None for i in range(1, 6)}}  # the label sent to the server joined
