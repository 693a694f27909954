"""The PostgreSQL prediction log (slipstream.monitor.store_pg) on a real cluster (the ``postgres_dsn`` fixture).

Each test gets a database of its own, so the tables start empty and the fleet tests' tables are untouched.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from slipstream.cli import app
from slipstream.errors import ConfigError
from slipstream.monitor.location import parse_location, redact
from slipstream.monitor.logfile import read_batches, read_snapshots
from slipstream.monitor.profile import Profile
from slipstream.monitor.records import Feedback, PredictionRecord, Snapshot
from slipstream.monitor.report import summarize
from slipstream.monitor.service import Monitor, MonitorConfig
from slipstream.monitor.store import SQLiteStore, StoreConfig, open_store
from slipstream.monitor.store_pg import SCHEMA_VERSION, PostgresStore, connect, migrate, schema_version
from slipstream.runtime.engine import Engine
from tests.monitor.conftest import Digits
from tests.pg_support import PostgresCluster


def _record(i: int, ts: float = 1000.0, group: str | None = None) -> PredictionRecord:
    return PredictionRecord(
        request_id=f"r{i}",
        ts=ts + i,
        model="digits",
        version="1",
        latency_ms=1.5,
        input_stats={"mean": 0.5},
        outputs={"probabilities": [0.1, 0.9]},
        prediction=float(i % 2),
        confidence=0.9,
        group=group,
        key_id="k1",
    )


@pytest.fixture
def pg_url(postgres_dsn: str) -> Iterator[str]:
    """A fresh, empty database on the session's cluster, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _rows_in(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT COALESCE(SUM(rows), 0) FROM prediction_log").fetchone()
    return int(row[0]) if row else -1


# -- where the log is -----------------------------------------------------------------------------


def test_a_location_is_parsed_once_into_a_path_or_a_url(tmp_path: Path) -> None:
    url = "postgresql://app@db.internal:5432/slip?sslmode=verify-full&sslrootcert=/ca.pem"
    config = StoreConfig(path=url)  # type: ignore[arg-type]  # what --monitor-db hands over: a string
    assert config.path is None and config.url == url  # TLS settings pass through untouched
    assert StoreConfig(path="postgres://app@db/slip").url == "postgres://app@db/slip"  # type: ignore[arg-type]
    plain = StoreConfig(path=str(tmp_path / "log.db"))  # type: ignore[arg-type]
    assert plain.path == tmp_path / "log.db" and plain.url is None
    assert parse_location("C:/logs/monitor.db") == Path("C:/logs/monitor.db")  # a drive letter is no scheme


@pytest.mark.parametrize("text", ["mysql://u@h/db", "sqlite:///tmp/x.db", "s3://bucket/log.db", "http://h/x"])
def test_an_unknown_scheme_is_refused_and_creates_nothing(text: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="expected a file path \\(SQLite\\) or a postgresql:// URL"):
        StoreConfig(path=text)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_postgres_url_no_longer_becomes_a_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # It used to: Path('postgresql://...') made a directory 'postgresql:' with a SQLite file inside.
    monkeypatch.chdir(tmp_path)
    config = StoreConfig(path="postgresql://postgres@127.0.0.1:1/slipstream", connect_timeout_s=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Cannot reach the prediction log's database"):
        open_store(config)
    with pytest.raises(ConfigError, match="needs a SQLite"):
        SQLiteStore(config)
    assert list(tmp_path.iterdir()) == []


def test_a_password_in_the_url_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="carries a password") as err:
        StoreConfig(path="postgresql://app:s3cret@db/slip")  # type: ignore[arg-type]
    assert "s3cret" not in str(err.value) and "PGPASSWORD" in (err.value.hint or "")
    assert redact("postgresql://app:s3cret@db/slip") == "postgresql://app:***@db/slip"


def test_the_password_comes_from_pgpassfile_or_pgpassword(
    pg_url: str, postgres_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    role = f"pw_{uuid.uuid4().hex[:8]}"
    postgres_cluster.add_password_role(role, "from-the-file")
    url = pg_url.replace("postgres@", f"{role}@")
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="password"):  # asked for one and none came: a clear error
        PostgresStore(StoreConfig(url=url, connect_timeout_s=2))
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:*:*:{role}:from-the-file\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    with connect(StoreConfig(url=pg_url)) as admin:  # the role may create the tables in this database
        admin.execute(f"GRANT ALL ON SCHEMA public TO {role}")
        admin.commit()
    store = PostgresStore(StoreConfig(url=url))
    try:
        assert store.put(_record(1)) and store.flush()
        assert store.counts()["written_predictions"] == 1
    finally:
        store.close()
    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("PGPASSWORD", "from-the-file")
    PostgresStore(StoreConfig(url=url)).close()


# -- writing and reading --------------------------------------------------------------------------


def test_records_and_late_labels_are_written_and_joined(pg_url: str) -> None:
    store = PostgresStore(StoreConfig(url=pg_url, batch_records=4))
    try:
        assert store.put_feedback([Feedback("r3", 1.0, 5.0)]) == 1  # a label may come before its prediction
        assert all(store.put(_record(i, group="a" if i < 5 else "b")) for i in range(10))
        assert store.put_feedback(Feedback(f"r{i}", float(i % 2), 10.0) for i in range(5)) == 5
        assert store.put_snapshot(Snapshot(ts=1.0, model="digits", body='{"n": 1}'))
        assert store.flush()
        rows = store.labeled()
        assert [r.request_id for r in rows] == [f"r{i}" for i in range(10)]
        assert [r.label for r in rows[:5]] == [0.0, 1.0, 0.0, 1.0, 0.0] and all(r.label is None for r in rows[5:])
        assert {r.group for r in rows} == {"a", "b"} and rows[0].key_id == "k1"
        assert [r.request_id for r in store.labeled(limit=3)] == ["r7", "r8", "r9"]
        assert [r.request_id for r in store.labeled(since_ts=1008.0)] == ["r8", "r9"]
        assert [r.request_id for r in store.labeled(labeled_only=True)] == [f"r{i}" for i in range(5)]
        assert store.labeled(model="other") == []
        assert store.snapshots() == [Snapshot(ts=1.0, model="digits", body='{"n": 1}')]
        counts = store.counts()
        assert counts["written_predictions"] == 10 and counts["written_feedback"] == 6 and counts["dropped"] == 0
    finally:
        store.close()
    assert _rows_in(pg_url) == 10


def test_two_replicas_share_one_log_and_labels_join_across_them(pg_url: str) -> None:
    a, b = PostgresStore(StoreConfig(url=pg_url)), PostgresStore(StoreConfig(url=pg_url))
    try:
        assert a.put(_record(1)) and b.put(_record(2))
        assert b.put_feedback([Feedback("r1", 1.0, 2000.0)]) == 1  # the label reaches the other replica
        assert a.flush() and b.flush()
        for store in (a, b):
            rows = store.labeled()
            assert [(r.request_id, r.label) for r in rows] == [("r1", 1.0), ("r2", None)]
    finally:
        a.close()
        b.close()


def test_the_schema_version_is_recorded_and_a_newer_one_refused(pg_url: str) -> None:
    store = PostgresStore(StoreConfig(url=pg_url))
    store.close()
    with connect(StoreConfig(url=pg_url)) as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        assert migrate(conn) == SCHEMA_VERSION  # idempotent: nothing to do
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        assert {"prediction_log_model", "prediction_log_ts", "feedback_pkey", "feedback_ts"} <= indexes
        conn.execute("UPDATE slipstream_schema SET version = %s", (SCHEMA_VERSION + 1,))
        conn.commit()
    with pytest.raises(ConfigError, match=f"version {SCHEMA_VERSION + 1}"):
        PostgresStore(StoreConfig(url=pg_url))


def test_retention_by_rows_and_by_age(pg_url: str) -> None:
    now = [10_000.0]
    store = PostgresStore(StoreConfig(url=pg_url, max_rows=5, max_age_s=3_000.0), clock=lambda: now[0])
    try:
        for i in range(8):  # batches of one row, ts 1000..1007
            store.put(_record(i, ts=1000.0))
        store.put(_record(100, ts=8000.0))
        store.put_feedback([Feedback("r0", 1.0, 1000.0), Feedback("r100", 1.0, 9000.0)])
        assert store.flush()
        store.run_retention()
        # age: everything before 7000 goes; rows: at most 5 remain (newest kept)
        assert [r.request_id for r in store.labeled()] == ["r100"]
        assert [r.label for r in store.labeled(labeled_only=True)] == [1.0]
        with connect(StoreConfig(url=pg_url)) as conn:
            assert conn.execute("SELECT request_id FROM feedback").fetchall() == [("r100",)]
    finally:
        store.close()


def test_retention_by_rows_keeps_the_newest(pg_url: str) -> None:
    store = PostgresStore(StoreConfig(url=pg_url, max_rows=3, max_age_s=None))
    try:
        for i in range(7):
            store.put(_record(i))
        assert store.flush()
        store.run_retention()
        assert [r.request_id for r in store.labeled()] == ["r4", "r5", "r6"]
    finally:
        store.close()


# -- faults ---------------------------------------------------------------------------------------


def test_unreachable_at_start_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="Cannot reach the prediction log's database at 'postgresql://") as err:
        PostgresStore(StoreConfig(url="postgresql://postgres@127.0.0.1:1/slipstream", connect_timeout_s=1))
    assert "--monitor-db-degraded-start" in (err.value.hint or "")


def test_restart_under_writes_loses_nothing_silently(pg_url: str, postgres_cluster: PostgresCluster) -> None:
    store = PostgresStore(StoreConfig(url=pg_url, buffer_records=2_000, batch_records=50, flush_interval_s=0.02))
    stop = threading.Event()
    offered = [0]

    def load() -> None:
        i = 0
        while not stop.is_set():
            store.put(_record(i))
            offered[0] += 1
            i += 1
            if i % 50 == 0:
                stop.wait(0.002)

    writer = threading.Thread(target=load)
    writer.start()
    try:
        stop.wait(0.3)
        postgres_cluster.restart(down_s=1.0)  # connections are cut; the buffer (2,000) overflows meanwhile
        stop.wait(0.3)
    finally:
        stop.set()
        writer.join()
    assert store.flush(timeout_s=30)
    counts = store.counts()
    store.close()
    assert store.retries > 0  # the writer did meet the dead database
    assert counts["dropped_buffer_full"] > 0 and counts["dropped_db_error"] == 0
    assert offered[0] == counts["written_predictions"] + counts["dropped"]  # exact, by reason
    assert _rows_in(pg_url) == counts["written_predictions"]


def test_degraded_start_buffers_until_the_database_comes(pg_url: str, postgres_cluster: PostgresCluster) -> None:
    postgres_cluster.stop()
    try:
        store = PostgresStore(StoreConfig(url=pg_url, degraded_start=True, connect_timeout_s=1))
        assert store.degraded
        assert all(store.put(_record(i)) for i in range(20))
        assert not store.flush(timeout_s=0.3)  # waiting, not dropped
        assert store.counts()["dropped"] == 0 and store.counts()["pending"] == 20
    finally:
        postgres_cluster.start()
    try:
        assert store.flush(timeout_s=30)
        assert store.counts()["written_predictions"] == 20 and not store.degraded
    finally:
        store.close()
    assert _rows_in(pg_url) == 20


# -- the offline views read PostgreSQL as they read SQLite ----------------------------------------


@pytest.fixture
def same_log_twice(
    pg_url: str, tmp_path: Path, digits_profile: Profile, digits: Digits, digits_engine: Engine
) -> tuple[Path, str]:
    """A real log (monitored digits, clean then noisy, labels, two groups, summaries) in SQLite, copied
    batch by batch into PostgreSQL through PostgresStore."""
    db = tmp_path / "monitor.db"
    store = SQLiteStore(StoreConfig(path=db))
    monitor = Monitor(model="digits", version="1", profile=digits_profile, store=store,
                      config=MonitorConfig(window_rows=100, seed=0))  # fmt: skip
    for phase, x in (("c", digits.x_live[:150]), ("s", digits.noisy(digits.x_live[:150], scale=6.0))):
        for i in range(150):
            feeds = {"pixels": x[i : i + 1]}
            monitor.observe(f"{phase}{i}", feeds, digits_engine.run(feeds), latency_s=0.001 * (1 + i % 7),
                            group="a" if i % 3 else "b", key_id="k")  # fmt: skip
        monitor.feedback_many((f"{phase}{i}", float(digits.y_live[i])) for i in range(150))
        store.flush()
        monitor.evaluate()
    monitor.close()
    pg = PostgresStore(StoreConfig(url=pg_url))
    conn = sqlite3.connect(db)
    try:
        for batch in read_batches(conn):
            assert pg.put_batch(batch) == len(batch)
        pg.put_feedback(Feedback(r, float(lab), ts) for r, lab, ts in conn.execute("SELECT * FROM feedback"))
        for snap in read_snapshots(db):
            pg.put_snapshot(snap)
    finally:
        conn.close()
    pg.close()
    return db, pg_url


def test_status_and_report_of_a_postgres_log_equal_those_of_the_same_sqlite_log(
    same_log_twice: tuple[Path, str],
) -> None:
    db, url = same_log_twice
    lite, pg = summarize(db), summarize(url)
    assert pg.predictions == 300 and pg.labeled == 300 and pg.snapshots == 2 and pg.path == url
    assert pg.model_dump(exclude={"path"}) == lite.model_dump(exclude={"path"})


@pytest.mark.slow
def test_the_postgres_report_renders_in_headless_chromium(same_log_twice: tuple[Path, str], tmp_path: Path) -> None:
    from tests.browser import screenshot

    _, url = same_log_twice
    html = tmp_path / "monitor.html"
    result = CliRunner().invoke(app, ["monitor", "report", "--db", url, "-o", str(html)])
    assert result.exit_code == 0, result.output
    facts = screenshot(html.as_uri(), tmp_path / "monitor.png", selector="svg")
    assert facts["title"] == "slipstream monitor report"
    svgs = facts["svgs"]
    assert isinstance(svgs, list) and len(svgs) >= 7
    for svg in svgs:
        assert svg["w"] >= 600 and svg["h"] >= 200
