from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from slipstream.errors import ConfigError
from slipstream.monitor.logfile import read_records
from slipstream.monitor.records import Feedback, PredictionBatch, PredictionRecord, pack, unpack
from slipstream.monitor.store import SQLiteStore, StoreConfig


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


def test_records_and_late_labels_are_written_and_joined(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db"))
    try:
        assert store.put_feedback([Feedback("r3", 1.0, 5.0)]) == 1  # a label may come before its prediction
        assert all(store.put(_record(i, group="a" if i < 5 else "b")) for i in range(10))
        assert store.put_feedback(Feedback(f"r{i}", float(i % 2), 10.0) for i in range(5)) == 5  # bulk
        assert store.flush()
        rows = store.labeled()
        assert [r.request_id for r in rows] == [f"r{i}" for i in range(10)]
        assert [r.label for r in rows[:5]] == [0.0, 1.0, 0.0, 1.0, 0.0] and all(r.label is None for r in rows[5:])
        assert {r.group for r in rows} == {"a", "b"} and rows[0].key_id == "k1"
        assert [r.request_id for r in store.labeled(limit=3)] == ["r7", "r8", "r9"]
        assert [r.request_id for r in store.labeled(since_ts=1008.0)] == ["r8", "r9"]
        counts = store.counts()
        assert counts["written_predictions"] == 10 and counts["written_feedback"] == 6 and counts["dropped"] == 0
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "log.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_close_flushes_everything_queued(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db", flush_interval_s=5.0, batch_records=7))
    for i in range(500):
        store.put(_record(i))
    store.close()
    conn = sqlite3.connect(tmp_path / "log.db")
    assert conn.execute("SELECT SUM(rows) FROM prediction_log").fetchone()[0] == 500
    conn.close()
    assert store.put(_record(999)) is False  # a closed store drops, counted, and does not raise
    assert store.counts()["dropped_closed"] == 1


def test_a_locked_database_drops_and_counts_records_and_never_blocks_puts(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(
        StoreConfig(path=path, buffer_records=50, batch_records=10, busy_timeout_ms=50, flush_interval_s=0.01)
    )
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database: every write fails
    try:
        results = [store.put(_record(i)) for i in range(2000)]
        store.flush(timeout_s=30)
        c = store.counts()
        # Every record is accounted for: written + dropped by reason == offered.
        assert c["written_predictions"] + c["dropped_db_error"] + c["dropped_buffer_full"] == 2000
        assert c["dropped_db_error"] > 0 and c["dropped_buffer_full"] > 0
        assert results.count(False) == c["dropped_buffer_full"]
        assert store.last_error is not None and "locked" in store.last_error
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Once the database is free again the writer reconnects and carries on.
    assert store.put(_record(5000))
    assert store.flush()
    assert store.labeled(limit=1)[0].request_id == "r5000"
    store.close()


def test_puts_from_many_threads_are_all_accounted_for(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db", buffer_records=100_000))

    def worker(base: int) -> None:
        for i in range(250):
            store.put(_record(base + i))

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    c = store.counts()
    assert c["accepted_predictions"] == 1000 and c["written_predictions"] == 1000 and c["dropped"] == 0


def test_retention_by_rows_and_age(tmp_path: Path) -> None:
    now = [10_000.0]
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db", max_rows=30, max_age_s=100), clock=lambda: now[0])
    for i in range(50):
        store.put(_record(i, ts=9_800.0 + 3 * i))  # ts = 9800 + 4i (the record adds i): 9800 .. 9996
    store.flush()
    store.run_retention()
    kept = store.labeled()
    assert len(kept) == 25  # the newest 30 (r20..r49), minus those older than now - 100 s (r20..r24)
    assert kept[0].ts >= 9_900.0 and kept[-1].request_id == "r49"
    store.close()


def test_an_unusable_path_fails_loudly_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="Cannot open the prediction log"):
        SQLiteStore(StoreConfig(path=tmp_path / "file" / "log.db"))


def _batch(n: int, start: int = 0, ts: float = 1000.0) -> PredictionBatch:
    return PredictionBatch(
        model="digits",
        version="1",
        request_ids=[f"r{start + i}" for i in range(n)],
        ts=ts + np.arange(n, dtype=np.float64),
        latency_ms=np.full(n, 2.0),
        groups=["a"] * n,
        key_ids=[None] * n,
        prediction=np.arange(n, dtype=np.float64) % 2,
        input_stats={"pixels.mean": np.linspace(0, 1, n)},
        outputs={"probabilities": np.ones((n, 3), np.float32)},
    )


def test_a_batch_is_one_row_and_its_records_come_back_whole(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db"))
    assert store.put_batch(_batch(40)) == 40 and store.put(_record(99)) and store.flush()
    store.put_feedback([Feedback("r7", 1.0, 2000.0)])
    store.close()
    conn = sqlite3.connect(tmp_path / "log.db")
    assert conn.execute("SELECT COUNT(*), SUM(rows) FROM prediction_log").fetchone() == (2, 41)
    conn.close()
    records = read_records(tmp_path / "log.db")
    assert [r.request_id for r in records] == [f"r{i}" for i in range(40)] + ["r99"]
    assert records[3].prediction == 1.0 and records[3].confidence is None and records[3].group == "a"
    assert records[3].outputs == {"probabilities": [1.0, 1.0, 1.0]} and records[-1].input_stats == {"mean": 0.5}
    rows = store.labeled(limit=5, labeled_only=True)
    assert [(r.request_id, r.label) for r in rows] == [("r7", 1.0)]


def test_a_full_buffer_takes_what_fits_of_a_batch_and_counts_the_rest(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db", buffer_records=50, flush_interval_s=5.0))
    # The writer, woken at a quarter full, would otherwise empty the buffer between two puts: once it waits on
    # its wake-up event, the puts are given another one to set, and the writer's is set only by close().
    wake = store._wake
    while not wake._cond._waiters:  # type: ignore[attr-defined]
        time.sleep(0.001)
    store._wake = threading.Event()
    assert store.put_batch(_batch(30)) == 30
    assert store.put_batch(_batch(30, start=30)) == 20  # the first 20 fit
    assert store.put_batch(_batch(5, start=60)) == 0
    store._wake = wake
    store.close()
    c = store.counts()
    assert c["accepted_predictions"] == c["written_predictions"] == 50 and c["dropped_buffer_full"] == 15
    assert [r.request_id for r in read_records(tmp_path / "log.db")][-1] == "r49"


def test_retention_by_rows_deletes_whole_batches_oldest_first(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db", max_rows=25, max_age_s=None))
    for k in range(4):
        store.put_batch(_batch(10, start=10 * k, ts=1000.0 + 100 * k))
    store.flush()
    store.run_retention()
    kept = store.labeled()
    assert [r.request_id for r in kept] == [f"r{i}" for i in range(20, 40)]  # 30 would exceed 25: 20 kept
    store.close()


def test_garbage_is_not_read_as_a_batch() -> None:
    with pytest.raises(ValueError, match="not a prediction batch"):
        unpack(b"\x05\x00\x00\x00hello")
    blob = pack(_batch(3))
    assert len(unpack(blob)) == 3 and unpack(blob).outputs["probabilities"].dtype == np.float32


def test_text_inputs_are_logged_as_text() -> None:
    batch = _batch(2)
    batch.raw_inputs = {"text": np.array([b"h\xc3\xa9llo", "plain"], dtype=object), "x": np.eye(2, dtype=np.float16)}
    raw = unpack(pack(batch)).raw_inputs
    assert raw is not None and raw["text"].tolist() == ["héllo", "plain"] and raw["x"].dtype == np.float16


def test_the_buffer_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db", buffer_mb=0.05, flush_interval_s=5.0))
    batch = _batch(20)
    batch.raw_inputs = {"image": np.zeros((20, 3, 32, 32), np.float32)}  # ~12 KB a row
    taken = store.put_batch(batch)
    assert 0 < taken < 5 and store.counts()["dropped_buffer_full"] == 20 - taken
    store.close()
    assert len(read_records(tmp_path / "log.db")) == taken


def test_a_windowed_read_looks_back_only_so_far_for_labels(tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "log.db", max_scan_rows=50))
    assert store.labeled(limit=5, labeled_only=True) == []  # no label at all
    for k in range(10):
        store.put_batch(_batch(10, start=10 * k, ts=1000.0 + 10 * k))
    store.put_feedback([Feedback("r0", 1.0, 2000.0), Feedback("r95", 0.0, 2000.0)])
    store.flush()
    assert [r.request_id for r in store.labeled(limit=5, labeled_only=True)] == ["r95"]  # r0 is 100 rows back
    assert [r.request_id for r in store.labeled(labeled_only=True)] == ["r0", "r95"]  # no window: all of it
    assert [r.request_id for r in store.labeled(since_ts=1097.5)] == ["r98", "r99"]  # inside a batch too
    store.close()


def test_a_log_from_an_earlier_version_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from slipstream.cli import app

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE predictions (seq INTEGER PRIMARY KEY, request_id TEXT)")
    conn.executemany("INSERT INTO predictions (request_id) VALUES (?)", [("a",), ("b",)])
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match=r"earlier slipstream \(2 rows, one per request\)") as info:
        SQLiteStore(StoreConfig(path=old))
    assert "new file" in (info.value.hint or "")
    conn = sqlite3.connect(old)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # the refused file is untouched
    conn.close()
    out = CliRunner().invoke(app, ["monitor", "status", "--db", str(old)])
    assert out.exit_code == 1 and "earlier slipstream" in out.output
