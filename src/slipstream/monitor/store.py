"""The prediction log: every sampled request and every feedback label, in SQLite (WAL) by default.

Predictions are logged in batches (:class:`~slipstream.monitor.records.PredictionBatch`, one table row per
batch, the columns packed in one BLOB): the monitor hands over what it ingested every 50 ms at once. One
background writer thread owns the write connection and drains a bounded queue, so the caller pays one
``deque.append``. :meth:`SQLiteStore.put_batch` and :meth:`SQLiteStore.put_feedback` never block and never
raise: a full buffer, a closed store or a database error drops the records and counts them by reason
(``dropped``), which the server exports to /metrics and the alert rules watch. Labels are kept in their own
table and joined by request id when read, so they may arrive before or long after the prediction was
written. Retention deletes batches older than ``max_age_s`` and beyond ``max_rows`` rows.

``Store`` is the interface (a Protocol) so that a PostgreSQL store for fleets of servers can come later.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from slipstream.errors import ConfigError
from slipstream.monitor.logfile import labeled_rows, labels_for, read_batches, read_snapshots, refuse_legacy
from slipstream.monitor.records import Feedback, LabeledRow, PredictionBatch, PredictionRecord, Snapshot, pack

log = logging.getLogger(__name__)

DropReason = Literal["buffer_full", "db_error", "closed"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS prediction_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_first REAL NOT NULL,
    ts_last REAL NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    rows INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS prediction_log_ts ON prediction_log (ts_last);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    label REAL NOT NULL,
    ts REAL NOT NULL
);
"""
"""``prediction_log`` holds one row per logged batch (``body``: :func:`slipstream.monitor.records.pack`);
read it with :mod:`slipstream.monitor.logfile`. Labels are one row each, joined by request id when read."""


class StoreConfig(BaseModel):
    """Where and how the prediction log is kept."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="SQLite database file (created with its directory).")
    buffer_records: int = Field(
        default=100_000, ge=1, description="Records the queue between the monitor and the writer holds at most."
    )
    buffer_mb: float = Field(
        default=256.0, gt=0, description="Megabytes the queue holds at most (logged raw inputs make records big)."
    )
    batch_records: int = Field(default=500, ge=1, description="Records written per transaction at most.")
    flush_interval_s: float = Field(default=0.2, gt=0, description="Longest a record waits before it is written.")
    busy_timeout_ms: int = Field(default=1000, ge=0, description="How long a write waits for a lock.")
    max_age_s: float | None = Field(default=7 * 86400, gt=0, description="Delete predictions older than this.")
    max_rows: int | None = Field(default=1_000_000, ge=1, description="Keep at most this many predictions.")
    retention_interval_s: float = Field(default=60.0, gt=0, description="How often retention runs.")
    max_scan_rows: int = Field(
        default=200_000, ge=1, description="Rows a windowed read (the monitor's quality window) looks back through."
    )


class Store(Protocol):
    """What the server and the monitor need from a prediction log."""

    def put(self, record: PredictionRecord) -> bool: ...
    def put_batch(self, batch: PredictionBatch) -> int: ...
    def put_feedback(self, items: Iterable[Feedback]) -> int: ...
    def labeled(
        self,
        *,
        since_ts: float | None = None,
        limit: int | None = None,
        labeled_only: bool = False,
        model: str | None = None,
        version: str | None = None,
    ) -> list[LabeledRow]: ...
    def put_snapshot(self, snapshot: Snapshot) -> bool: ...
    def snapshots(self, *, limit: int | None = None) -> list[Snapshot]: ...
    def counts(self) -> dict[str, int]: ...
    def flush(self, timeout_s: float = 5.0) -> bool: ...
    def close(self, timeout_s: float = 5.0) -> None: ...


class SQLiteStore:
    """The default :class:`Store`: SQLite in WAL mode behind one writer thread and a bounded queue."""

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        # deque.append / popleft are atomic: puts take no lock (a queue.Queue costs several µs per put).
        self._buf: deque[tuple[object, int, int]] = deque()  # (item, its records, its bytes), counted once
        self._inflight = 0  # records the writer has taken and not yet finished
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {"buffer_full": 0, "db_error": 0, "closed": 0}
        self._written = {"predictions": 0, "feedback": 0}
        self._accepted = 0
        self._queued = 0  # records queued (a batch counts its rows), bounded by buffer_records
        self._queued_bytes = 0  # the queued batches' arrays, bounded by buffer_mb
        self._max_bytes = int(config.buffer_mb * 1e6)
        self.last_error: str | None = None
        self._closed = False
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self.prepare(config)
        self._thread = threading.Thread(target=self._run, name="slipstream-store-writer", daemon=True)
        self._last_retention = clock()
        self._thread.start()

    @staticmethod
    def prepare(config: StoreConfig) -> None:
        """Create the log's directory, file and tables; ConfigError when the place is not writable."""
        try:
            config.path.parent.mkdir(parents=True, exist_ok=True)
            plain = sqlite3.connect(config.path)  # looked at before WAL mode is set: a refused file stays as it was
            try:
                refuse_legacy(plain, config.path, field="store.path")
            finally:
                plain.close()
            conn = _connect(config)
            conn.executescript(SCHEMA)
            conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"Cannot open the prediction log at '{config.path}': {exc}.",
                field="store.path",
                hint="Point the store at a writable file, or turn logging off.",
            ) from exc

    def _connect(self) -> sqlite3.Connection:
        return _connect(self.config)

    # -- the serving path -------------------------------------------------------------------------

    def _drop(self, reason: DropReason, n: int = 1) -> None:
        with self._lock:
            self._dropped[reason] += n

    def _enqueue(self, item: object, rows: int = 1, size: int = 0) -> int:
        """Queue ``item`` (``rows`` records, ``size`` bytes); returns how many records were taken."""
        if self._closed:
            self._drop("closed", rows)
            return 0
        with self._lock:  # uncontended: ~0.1 µs
            if self._queued + rows > self.config.buffer_records or self._queued_bytes + size > self._max_bytes:
                self._dropped["buffer_full"] += rows
                return 0
            self._queued += rows
            self._queued_bytes += size
            busy = self._queued * 4 >= self.config.buffer_records or self._queued_bytes * 4 >= self._max_bytes
        self._buf.append((item, rows, size))
        if busy:  # a quarter full: write now rather than at the next flush interval
            self._wake.set()
        return rows

    def put(self, record: PredictionRecord) -> bool:
        """Queue one record; False (and counted) when it had to be dropped. Never blocks."""
        return self.put_batch(PredictionBatch.of(record)) == 1

    def put_batch(self, batch: PredictionBatch) -> int:
        """Queue a batch of records; returns how many were accepted (as many as the buffer has room for),
        the rest dropped and counted. Never blocks."""
        n, size = len(batch), batch.nbytes
        if n == 0:
            return 0
        with self._lock:
            room = min(
                self.config.buffer_records - self._queued, int((self._max_bytes - self._queued_bytes) * n // size)
            )
        if 0 < room < n:
            self._drop("buffer_full", n - room)
            batch = batch.head(room)
            n, size = room, batch.nbytes
        taken = self._enqueue(batch, n, size)
        if taken:
            with self._lock:
                self._accepted += taken
        return taken

    def put_feedback(self, items: Iterable[Feedback]) -> int:
        """Queue labels (one or many); returns how many were accepted. Never blocks."""
        return sum(self._enqueue(item) for item in items)

    def put_snapshot(self, snapshot: Snapshot) -> bool:
        """Queue a monitor summary; never blocks (dropped and counted like a record when it must)."""
        return self._enqueue(snapshot) == 1

    # -- the writer thread ------------------------------------------------------------------------

    def _take(self) -> tuple[list[object], int, int]:
        """Queued items holding up to ``batch_records`` records (at least one item), their records and bytes."""
        items: list[object] = []
        rows = size = 0
        while self._buf and (not items or rows < self.config.batch_records):
            item, n, nbytes = self._buf.popleft()
            items.append(item)
            rows += n
            size += nbytes
        return items, rows, size

    def _run(self) -> None:
        # Wake every flush interval (or when flush/close asks) and drain the queue: one transaction per
        # ``batch_records`` records, and no thread switch per put.
        conn: sqlite3.Connection | None = None
        while True:
            self._wake.wait(self.config.flush_interval_s)
            self._wake.clear()
            stopping = self._closed
            while True:
                with self._idle:  # taking items and marking them in flight is one step for flush()
                    items, rows, size = self._take()
                    self._inflight = rows
                    self._queued -= rows
                    self._queued_bytes -= size
                if not items:
                    break
                conn = self._write_batch(conn, items, rows)
            if self._clock() - self._last_retention >= self.config.retention_interval_s:
                self._last_retention = self._clock()
                conn = self._write_batch(conn, [], 0)
            if stopping:
                break
        if conn is not None:
            conn.close()

    def _write_batch(
        self, conn: sqlite3.Connection | None, items: list[object], rows: int
    ) -> sqlite3.Connection | None:
        """Write queued items (none: run retention); on failure drop them, count them, reconnect later."""
        try:
            if conn is None:
                conn = self._connect()
            if items:
                self._write(conn, items)
            else:
                self._retain(conn)
        except Exception as exc:  # the writer must outlive any failure; every loss is counted, never silent
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("prediction log: dropped %d record(s): %s", rows, self.last_error)
            self._drop("db_error", rows)
            if conn is not None:
                conn.close()
            conn = None
        finally:
            with self._idle:
                self._inflight = 0
                self._idle.notify_all()
        return conn

    def _write(self, conn: sqlite3.Connection, items: list[object]) -> None:
        batches = [b for b in items if isinstance(b, PredictionBatch)]
        labels = [r for r in items if isinstance(r, Feedback)]
        snaps = [r for r in items if isinstance(r, Snapshot)]
        with conn:
            if snaps:
                conn.executemany(
                    "INSERT INTO snapshots (ts, model, body) VALUES (?, ?, ?)", [(x.ts, x.model, x.body) for x in snaps]
                )
            if batches:
                conn.executemany(
                    "INSERT INTO prediction_log (ts_first, ts_last, model, version, rows, body) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(float(b.ts.min()), float(b.ts.max()), b.model, b.version, len(b), pack(b)) for b in batches],
                )
            if labels:
                conn.executemany(
                    "INSERT OR REPLACE INTO feedback (request_id, label, ts) VALUES (?, ?, ?)",
                    [(f.request_id, f.label, f.ts) for f in labels],
                )
        with self._lock:
            self._written["predictions"] += sum(len(b) for b in batches)
            self._written["feedback"] += len(labels)

    def _retain(self, conn: sqlite3.Connection) -> None:
        now = self._clock()
        with conn:
            if self.config.max_age_s is not None:
                conn.execute("DELETE FROM prediction_log WHERE ts_last < ?", (now - self.config.max_age_s,))
                conn.execute("DELETE FROM snapshots WHERE ts < ?", (now - self.config.max_age_s,))
            if self.config.max_rows is not None:  # whole batches, newest kept: at most max_rows rows remain
                conn.execute(
                    "DELETE FROM prediction_log WHERE seq <= (SELECT seq FROM (SELECT seq, SUM(rows) OVER "
                    "(ORDER BY seq DESC) AS newer FROM prediction_log) WHERE newer > ? ORDER BY seq DESC LIMIT 1)",
                    (self.config.max_rows,),
                )
            # A label outlives its prediction only while it is young: labels come after their predictions,
            # so one older than the oldest kept prediction (or than max_age_s) has lost it.
            oldest = conn.execute("SELECT MIN(ts_first) FROM prediction_log").fetchone()[0]
            cutoff = now - (self.config.max_age_s or 7 * 86400)
            conn.execute("DELETE FROM feedback WHERE ts < ?", (cutoff if oldest is None else max(cutoff, oldest),))

    def run_retention(self) -> None:
        """Apply retention now (the writer also runs it every ``retention_interval_s``)."""
        conn = self._connect()
        try:
            self._retain(conn)
        finally:
            conn.close()

    # -- reading and lifecycle --------------------------------------------------------------------

    def labeled(
        self,
        *,
        since_ts: float | None = None,
        limit: int | None = None,
        labeled_only: bool = False,
        model: str | None = None,
        version: str | None = None,
    ) -> list[LabeledRow]:
        """Predictions (oldest first) joined with their labels; ``limit`` keeps the newest ``limit`` rows,
        ``labeled_only`` only those whose label has come. With a ``limit``, the read looks back through at
        most ``max_scan_rows`` rows (labels for older predictions are not looked for)."""
        conn = sqlite3.connect(self.config.path, timeout=self.config.busy_timeout_ms / 1000)
        try:
            if labeled_only and conn.execute("SELECT 1 FROM feedback LIMIT 1").fetchone() is None:
                return []  # no label at all: nothing to look for
            chunks: list[list[LabeledRow]] = []  # newest first
            total = scanned = 0
            budget = None if limit is None else max(limit, self.config.max_scan_rows)
            for batch in read_batches(conn, since_ts=since_ts, model=model, version=version, newest_first=True):
                labels = labels_for(conn, batch.request_ids)
                if labels or not labeled_only:
                    keep = labeled_rows(batch, labels, since_ts=since_ts, labeled_only=labeled_only)
                    chunks.append(keep)
                    total += len(keep)
                scanned += len(batch)
                if limit is not None and (total >= limit or (budget is not None and scanned >= budget)):
                    break
            out = [r for chunk in reversed(chunks) for r in chunk]
            return out[len(out) - limit :] if limit is not None and len(out) > limit else out
        finally:
            conn.close()

    def snapshots(self, *, limit: int | None = None) -> list[Snapshot]:
        """Stored monitor summaries, oldest first (the newest ``limit`` when given)."""
        return read_snapshots(self.config.path, limit=limit, timeout_s=self.config.busy_timeout_ms / 1000)

    def counts(self) -> dict[str, int]:
        """Accepted, written and dropped (by reason) records, and what still waits in the buffer."""
        with self._lock:
            out = {f"dropped_{k}": v for k, v in self._dropped.items()}
            out.update({f"written_{k}": v for k, v in self._written.items()})
            out["accepted_predictions"] = self._accepted
            out["dropped"] = sum(self._dropped.values())
            out["pending"] = self._queued + self._inflight
        return out

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._idle:
            while self._buf or self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
                self._wake.set()
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, write what is queued, stop the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)
        # A put that raced with close may have queued after the writer's last drain: count it, never lose it.
        late = 0
        while self._buf:
            late += self._buf.popleft()[1]
        if late:
            self._drop("closed", late)


def _connect(config: StoreConfig) -> sqlite3.Connection:
    conn = sqlite3.connect(config.path, timeout=config.busy_timeout_ms / 1000, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={config.busy_timeout_ms}")
    return conn


def _conforms(store: SQLiteStore) -> Store:
    """Type-level proof (mypy) that SQLiteStore implements the Store protocol."""
    return store
