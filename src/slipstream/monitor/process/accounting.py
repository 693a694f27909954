"""Exact accounting of what the server observed: every prediction (row) written, dropped or lost, once.

The server counts the rows it observed and the rows it shipped to each run of the monitor process; the
process acknowledges, cumulatively, the rows whose fate it has settled: dropped (by reason) or written.
What a run was sent and never acknowledged is *lost* when it dies. One gap remains in any acknowledgement
sent after a commit: a process killed between the two would have its last rows counted lost though they
are in the log. So the written count also lives in the log itself, in the transaction that writes the rows
(table ``monitor_runs``, one row per run of the process): after a death the server reads it from there, and
the rows it holds are counted written, exactly, whatever the moment of the kill.

:class:`AccountedStore` (in the monitor process) is :class:`slipstream.monitor.SQLiteStore` with that count in
each write transaction (:class:`AccountedPostgresStore` the same on PostgreSQL, table ``monitor_runs`` too;
:func:`accounted_store` picks one), the failed writes counted by cause (``disk_full``, ``db_error``), and the log's
optional size cap (``MonitorServing.log_max_mb``, SQLite's ``max_page_count``: past it a write fails exactly
as on a full disk).

One monitor process may serve several servers (``slipstream serve --workers N``: one per worker, each its
*client*); its books are then kept per client: the count in the log per (run, client), under the key
:func:`run_key`, and each client's written, failed and accepted rows apart, so that each server settles
its own rows exactly and the totals over the servers sum exactly.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

from slipstream.monitor.buffered import BufferedStore
from slipstream.monitor.store import SQLiteStore, StoreConfig, sqlite_path
from slipstream.monitor.store_pg import PostgresStore, connect

if TYPE_CHECKING:
    import psycopg
from slipstream.monitor.ingest import PendingRow
from slipstream.monitor.records import PredictionBatch

log = logging.getLogger("slipstream.monitor")

RUNS_SCHEMA = """
CREATE TABLE IF NOT EXISTS monitor_runs (
    run TEXT PRIMARY KEY,
    started REAL NOT NULL,
    written INTEGER NOT NULL DEFAULT 0
);
"""

_UPSERT = (
    "INSERT INTO monitor_runs (run, started, written) VALUES (?, ?, ?) "
    "ON CONFLICT(run) DO UPDATE SET written = written + excluded.written"
)

_PG_UPSERT = (
    "INSERT INTO monitor_runs (run, started, written) VALUES (%s, %s, %s) "
    "ON CONFLICT (run) DO UPDATE SET written = monitor_runs.written + excluded.written"
)

FULL = "database or disk is full"


def run_key(run: str, client: str = "") -> str:
    """The key of a run's written count in ``monitor_runs``: the run id, or ``run/client`` for one client of a
    monitor process that several servers share (the lone server's client is ``""``)."""
    return f"{run}/{client}" if client else run


class _Books(BufferedStore[Any]):
    """The per-client books of a store in the monitor process (mixed into a concrete store, before it)."""

    run: str
    client: str
    failed: dict[str, int]
    _split: dict[str, int]

    def _open_books(self, run: str) -> None:
        self.run = run
        self.client = ""  # whose rows the next put_batch takes (the monitor process's loop sets it)
        self.failed = {"disk_full": 0, "db_error": 0}
        self._failed_lock = threading.Lock()
        self._owner: dict[int, str] = {}  # id(queued batch) -> its client, until the writer takes it
        self._books: dict[str, list[int]] = {}  # client -> [accepted, written, disk_full, db_error]
        self._split = {}  # the writer's current transaction: rows per client

    def _enqueue(self, item: object, rows: int = 1, size: int = 0) -> int:
        if not isinstance(item, PredictionBatch):
            return super()._enqueue(item, rows, size)
        client = self.client
        # Owned before it is queued: the writer may take it the moment it is in the buffer.
        with self._failed_lock:
            self._owner[id(item)] = client
        taken = super()._enqueue(item, rows, size)
        with self._failed_lock:
            if taken:
                self._books.setdefault(client, [0, 0, 0, 0])[0] += taken
            else:
                self._owner.pop(id(item), None)
        return taken

    def _write_batch(self, conn: Any, items: list[object], rows: int) -> Any:
        split: dict[str, int] = {}
        with self._failed_lock:
            for b in items:
                if isinstance(b, PredictionBatch):
                    client = self._owner.pop(id(b), "")
                    split[client] = split.get(client, 0) + len(b)
        self._split = split  # only this thread writes
        predictions = sum(split.values())
        before = self.counts()["written_predictions"]
        # A database that is away is retried inside (PostgreSQL): the rows are settled when this returns.
        conn = super()._write_batch(conn, items, rows)
        self._split = {}
        if not predictions:
            return conn
        ok = self.counts()["written_predictions"] != before
        cause = "disk_full" if FULL in (self.last_error or "") else "db_error"
        with self._failed_lock:
            if not ok:
                self.failed[cause] += predictions
            for client, n in split.items():
                self._books.setdefault(client, [0, 0, 0, 0])[1 if ok else 2 if cause == "disk_full" else 3] += n
        return conn

    def settled(self, client: str | None = None) -> tuple[int, dict[str, int], int]:
        """Rows written, rows failed by cause, and rows accepted and not yet settled (waiting or in flight):
        of every client, or of one."""
        if client is not None:
            with self._failed_lock:
                accepted, written, full, error = self._books.get(client, (0, 0, 0, 0))
            return written, {"disk_full": full, "db_error": error}, accepted - written - full - error
        counts = self.counts()
        with self._failed_lock:
            failed = dict(self.failed)
        written = counts["written_predictions"]
        return written, failed, counts["accepted_predictions"] - written - sum(failed.values())


class AccountedStore(_Books, SQLiteStore):
    """The prediction log of one run of the monitor process, counting its written rows in the log itself.

    ``failed``: prediction rows the writer took and could not write, by cause; with the store's own
    ``written_predictions`` and what waits in its buffer, every accepted row is accounted for. Each row
    belongs to the client whose batch it came from (``client``, set by the one thread that puts), and all
    of that is counted per client too (:meth:`settled`)."""

    def __init__(self, config: StoreConfig, *, run: str, max_bytes: int | None = None) -> None:
        self._open_books(run)
        self._max_pages: int | None = None
        if max_bytes is not None:
            conn = sqlite3.connect(sqlite_path(config))
            try:
                page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            finally:
                conn.close()
            self._max_pages = max(1, max_bytes // page)
        super().__init__(config)
        try:
            conn = self._connect()
            try:
                with conn:
                    conn.executescript(RUNS_SCHEMA)
                    conn.execute(_UPSERT, (run, time.time(), 0))
            finally:
                conn.close()
        except sqlite3.Error as exc:  # e.g. a full disk: the writes will fail and be counted too
            log.warning("prediction log: could not record this run of the monitor process: %s", exc)

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        if self._max_pages is not None:
            conn.execute(f"PRAGMA max_page_count={self._max_pages}")
        return conn

    def _write(self, conn: sqlite3.Connection, items: list[object]) -> None:
        # Python's sqlite3 opens a transaction before this INSERT; the base class's ``with conn`` commits it
        # with the rows (or rolls both back): the count in the log is the rows in the log.
        now = time.time()
        for client, rows in self._split.items():
            if rows:
                conn.execute(_UPSERT, (run_key(self.run, client), now, rows))
        super()._write(conn, items)


class AccountedPostgresStore(_Books, PostgresStore):
    """:class:`AccountedStore` on PostgreSQL: the written count per (run, client) goes to ``monitor_runs`` in
    the transaction of the rows, and a database that is away is waited for (the rows stay in the buffer)."""

    def __init__(self, config: StoreConfig, *, run: str) -> None:
        self._open_books(run)
        super().__init__(config)

    def _write_extra(self, cur: psycopg.Cursor[Any], batches: list[PredictionBatch]) -> None:
        now = time.time()
        counts = [(run_key(self.run, client), now, rows) for client, rows in self._split.items() if rows]
        if counts:
            cur.executemany(_PG_UPSERT, counts)


def accounted_store(
    config: StoreConfig, *, run: str, max_bytes: int | None = None
) -> AccountedStore | AccountedPostgresStore:
    """The monitor process's store for ``config``: PostgreSQL for a URL, SQLite (size cap ``max_bytes``) else."""
    if config.url is not None:
        return AccountedPostgresStore(config, run=run)
    return AccountedStore(config, run=run, max_bytes=max_bytes)


def written_by_run(config: StoreConfig, run: str, timeout_s: float = 5.0) -> int | None:
    """The rows run ``run`` committed to the log ``config`` names, read from the log; None when unreadable."""
    if config.url is not None:
        return _pg_written_by_run(config, run)
    try:
        conn = sqlite3.connect(sqlite_path(config), timeout=timeout_s)
        try:
            row = conn.execute("SELECT written FROM monitor_runs WHERE run = ?", (run,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        log.warning("prediction log: could not read what run %s wrote: %s", run, exc)
        return None
    return int(row[0]) if row is not None else 0


def _pg_written_by_run(config: StoreConfig, run: str) -> int | None:
    import psycopg

    try:
        with connect(config, autocommit=True) as conn:
            row = conn.execute("SELECT written FROM monitor_runs WHERE run = %s", (run,)).fetchone()
    except psycopg.Error as exc:
        log.warning("prediction log: could not read what run %s wrote: %s", run, exc)
        return None
    return int(row[0]) if row is not None else 0


def rows_of(item: PendingRow) -> int:
    """The rows of an observed request, as :func:`slipstream.monitor.ingest.columns` counts them (1 when it
    cannot: such a request is malformed, and counted so)."""
    try:
        return len(next(iter(item[2].values())))  # Pending.inputs (queued as a plain tuple)
    except Exception:  # no input, or a 0-d one
        return 1
