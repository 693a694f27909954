"""The prediction log: every sampled request and every feedback label, in SQLite (WAL) by default.

Predictions are logged in batches (:class:`~slipstream.monitor.records.PredictionBatch`, one table row per
batch, the columns packed in one BLOB): the monitor hands over what it ingested every 50 ms at once. One
background writer thread owns the write connection and drains a bounded queue, so the caller pays one
``deque.append``. :meth:`SQLiteStore.put_batch` and :meth:`SQLiteStore.put_feedback` never block and never
raise: a full buffer, a closed store or a database error drops the records and counts them by reason
(``dropped``), which the server exports to /metrics and the alert rules watch. Labels are kept in their own
table and joined by request id when read, so they may arrive before or long after the prediction was
written. Retention deletes batches older than ``max_age_s`` and beyond ``max_rows`` rows.

``Store`` is the interface (a Protocol); :class:`~slipstream.monitor.store_pg.PostgresStore` is the log a fleet
of servers shares. :func:`open_store` picks one from :class:`StoreConfig`, whose ``path`` takes a file or a
URL (:mod:`slipstream.monitor.location`). The buffer and the writer thread are shared
(:class:`~slipstream.monitor.buffered.BufferedStore`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slipstream.errors import ConfigError
from slipstream.monitor.buffered import BufferedStore, DropReason
from slipstream.monitor.location import parse_location, redact
from slipstream.monitor.logfile import collect_labeled, labels_for, read_batches, read_snapshots, refuse_legacy
from slipstream.monitor.records import Feedback, LabeledRow, PredictionBatch, PredictionRecord, Snapshot, pack

log = logging.getLogger(__name__)

__all__ = ["DropReason", "SQLiteStore", "Store", "StoreConfig", "open_store", "prepare_store", "sqlite_path"]

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

    path: Path | None = Field(
        default=None,
        description="SQLite database file (created with its directory); None when the log is the database at url.",
    )
    url: str | None = Field(
        default=None,
        description="postgresql:// URL of a log a fleet shares (no password in it: PGPASSWORD or PGPASSFILE).",
    )
    degraded_start: bool = Field(
        default=False,
        description="Start even when the database at url cannot be reached: records wait in the buffer (logged).",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="How long connecting to the database may take.")
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

    @model_validator(mode="before")
    @classmethod
    def _one_location(cls, data: Any) -> Any:
        # ``path`` takes whatever the user typed (a file or a URL), parsed here once: a URL moves to ``url``.
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            where = parse_location(data["path"])
            if isinstance(where, str):  # a path stays the string it came as (JSON-mode validation wants one)
                data = {**data, "path": None, "url": where}
        url = data.get("url") if isinstance(data, dict) else None
        if isinstance(url, str) and not isinstance(parse_location(url, field="store.url"), str):
            raise ConfigError(
                f"store.url must be a postgresql:// URL; got '{data['url']}'.",
                field="store.url",
                hint="Give a file path in store.path instead.",
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> StoreConfig:
        if (self.path is None) == (self.url is None):
            raise ValueError("give the prediction log's place: either path (a SQLite file) or url (postgresql://)")
        return self

    @property
    def location(self) -> str:
        """The log's place as the user gave it (a path, or the URL), for messages and reports."""
        return str(self.path) if self.path is not None else redact(self.url or "")


def sqlite_path(config: StoreConfig) -> Path:
    """The SQLite file of ``config``; ConfigError when the log is a database URL."""
    if config.path is None:
        raise ConfigError(
            f"This needs a SQLite prediction log; got the database URL '{config.location}'.",
            field="store.path",
            hint="Open the log with slipstream.monitor.open_store(config), which picks PostgresStore for URLs.",
        )
    return config.path


def open_store(config: StoreConfig) -> Store:
    """The store for ``config``'s place: PostgresStore for a URL, SQLiteStore for a file."""
    if config.url is not None:
        from slipstream.monitor.store_pg import PostgresStore

        return PostgresStore(config)
    return SQLiteStore(config)


def prepare_store(config: StoreConfig) -> None:
    """Check, before anything is served, that the log can be opened (and create its tables)."""
    if config.url is not None:
        from slipstream.monitor.store_pg import PostgresStore

        PostgresStore.prepare(config)
    else:
        SQLiteStore.prepare(config)


def retain(execute: Callable[[str, tuple[Any, ...]], Any], config: StoreConfig, now: float, mark: str) -> None:
    """Apply ``config``'s retention through ``execute`` (a connection's, inside the caller's transaction):
    the same statements for SQLite and PostgreSQL, with the driver's parameter ``mark`` ('?' or '%s')."""
    if config.max_age_s is not None:
        execute(f"DELETE FROM prediction_log WHERE ts_last < {mark}", (now - config.max_age_s,))
        execute(f"DELETE FROM snapshots WHERE ts < {mark}", (now - config.max_age_s,))
    if config.max_rows is not None:  # whole batches, newest kept: at most max_rows rows remain
        execute(
            "DELETE FROM prediction_log WHERE seq <= (SELECT seq FROM (SELECT seq, SUM(rows) OVER "
            f"(ORDER BY seq DESC) AS newer FROM prediction_log) AS t WHERE newer > {mark} "
            "ORDER BY seq DESC LIMIT 1)",
            (config.max_rows,),
        )
    # A label outlives its prediction only while it is young: labels come after their predictions, so one
    # older than the oldest kept prediction (or than max_age_s) has lost it.
    row = execute("SELECT MIN(ts_first) FROM prediction_log", ()).fetchone()
    oldest = None if row is None else row[0]
    cutoff = now - (config.max_age_s or 7 * 86400)
    execute(f"DELETE FROM feedback WHERE ts < {mark}", (cutoff if oldest is None else max(cutoff, oldest),))


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


class SQLiteStore(BufferedStore[sqlite3.Connection]):
    """The default :class:`Store`: SQLite in WAL mode behind one writer thread and a bounded queue
    (:class:`~slipstream.monitor.buffered.BufferedStore`)."""

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.path: Path = sqlite_path(config)
        super().__init__(
            buffer_records=config.buffer_records,
            buffer_mb=config.buffer_mb,
            batch_records=config.batch_records,
            flush_interval_s=config.flush_interval_s,
            retention_interval_s=config.retention_interval_s,
            clock=clock,
        )
        self.prepare(config)
        self._start_writer()

    @staticmethod
    def prepare(config: StoreConfig) -> None:
        """Create the log's directory, file and tables; ConfigError when the place is not writable."""
        path = sqlite_path(config)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            plain = sqlite3.connect(path)  # looked at before WAL mode is set: a refused file stays as it was
            try:
                refuse_legacy(plain, path, field="store.path")
            finally:
                plain.close()
            conn = _connect(config)
            conn.executescript(SCHEMA)
            conn.close()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"Cannot open the prediction log at '{path}': {exc}.",
                field="store.path",
                hint="Point the store at a writable file, or turn logging off.",
            ) from exc

    def _connect(self) -> sqlite3.Connection:
        return _connect(self.config)

    def _close_conn(self, conn: sqlite3.Connection) -> None:
        conn.close()

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
        self._count_written(sum(len(b) for b in batches), len(labels))

    def _retain(self, conn: sqlite3.Connection) -> None:
        with conn:
            retain(conn.execute, self.config, self._clock(), "?")

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
        conn = sqlite3.connect(self.path, timeout=self.config.busy_timeout_ms / 1000)
        try:
            if labeled_only and conn.execute("SELECT 1 FROM feedback LIMIT 1").fetchone() is None:
                return []  # no label at all: nothing to look for
            batches = read_batches(conn, since_ts=since_ts, model=model, version=version, newest_first=True)
            return collect_labeled(
                batches,
                lambda ids: labels_for(conn, ids),
                since_ts=since_ts,
                limit=limit,
                labeled_only=labeled_only,
                max_scan_rows=self.config.max_scan_rows,
            )
        finally:
            conn.close()

    def snapshots(self, *, limit: int | None = None) -> list[Snapshot]:
        """Stored monitor summaries, oldest first (the newest ``limit`` when given)."""
        return read_snapshots(self.path, limit=limit, timeout_s=self.config.busy_timeout_ms / 1000)


def _connect(config: StoreConfig) -> sqlite3.Connection:
    conn = sqlite3.connect(sqlite_path(config), timeout=config.busy_timeout_ms / 1000, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={config.busy_timeout_ms}")
    return conn


def _conforms(store: SQLiteStore) -> Store:
    """Type-level proof (mypy) that SQLiteStore implements the Store protocol."""
    return store
