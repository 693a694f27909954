"""The prediction log in PostgreSQL: one log that every replica of a fleet writes and reads.

Same tables and the same packed batches as the SQLite log (:mod:`slipstream.monitor.store`), written by the
same bounded buffer and writer thread (:class:`~slipstream.monitor.buffered.BufferedStore`): one
transaction per ``batch_records`` records, each table's rows sent with psycopg's pipelined ``executemany``.
The difference is what a failure means. A database that restarts or cannot be reached is *away*, not
broken: the writer keeps what it took, backs off and writes it after it reconnects, while serving goes on
and new records wait in the bounded buffer (what does not fit is dropped as ``buffer_full``, counted).

The schema is created and migrated by slipstream: ``slipstream_schema`` records the version, and replicas
that start together migrate under a transaction-level advisory lock, one after the other. Passwords come
from ``PGPASSWORD`` or ``PGPASSFILE`` (read by libpq), never from the URL; TLS settings (``sslmode=...``)
pass through the URL's query to libpq.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from slipstream.errors import ConfigError, MissingDependencyError
from slipstream.monitor.buffered import BufferedStore
from slipstream.monitor.location import redact
from slipstream.monitor.logfile import collect_labeled
from slipstream.monitor.records import Feedback, LabeledRow, PredictionBatch, Snapshot, pack, unpack
from slipstream.monitor.store import Store, StoreConfig, retain

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("slipstream.monitor.store")

SCHEMA_VERSION = 1
_MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE IF NOT EXISTS prediction_log (
    seq BIGSERIAL PRIMARY KEY,
    ts_first DOUBLE PRECISION NOT NULL,
    ts_last DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    rows INTEGER NOT NULL,
    body BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS prediction_log_ts ON prediction_log (ts_last);
CREATE INDEX IF NOT EXISTS prediction_log_model ON prediction_log (model, version, seq);
CREATE TABLE IF NOT EXISTS snapshots (
    seq BIGSERIAL PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_ts ON snapshots (ts);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    label DOUBLE PRECISION NOT NULL,
    ts DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_ts ON feedback (ts);
CREATE TABLE IF NOT EXISTS monitor_runs (
    run TEXT PRIMARY KEY,
    started DOUBLE PRECISION NOT NULL,
    written BIGINT NOT NULL DEFAULT 0
);
""",
}
"""Each version's DDL, applied in order to a database at an older version (the feedback join reads
``feedback`` by its primary key; window reads walk ``prediction_log_model`` newest first)."""

_MIGRATION_LOCK = 0x511B_5EA3  # pg_advisory_xact_lock key: replicas that start together migrate one by one


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise MissingDependencyError("psycopg", extra="postgres", feature="A PostgreSQL prediction log") from exc
    return psycopg


def connect(config: StoreConfig, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A connection to ``config.url`` (libpq reads PGPASSWORD/PGPASSFILE and the URL's TLS settings)."""
    pg = _psycopg()
    conn: psycopg.Connection[Any] = pg.connect(
        config.url or "",
        connect_timeout=max(1, round(config.connect_timeout_s)),
        application_name="slipstream",
        autocommit=autocommit,
    )
    return conn


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found before. ConfigError when the
    database was migrated by a newer slipstream."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS slipstream_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL, "
            "migrated_at DOUBLE PRECISION NOT NULL)"
        )
        row = conn.execute("SELECT version FROM slipstream_schema WHERE component = 'prediction_log'").fetchone()
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise ConfigError(
                f"The prediction log's schema is at version {found}; this slipstream knows up to {SCHEMA_VERSION}.",
                field="store.url",
                hint="Upgrade slipstream on this replica, or point it at another database.",
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            conn.execute(_MIGRATIONS[version])
        if found < SCHEMA_VERSION:
            conn.execute(
                "INSERT INTO slipstream_schema (component, version, migrated_at) VALUES ('prediction_log', %s, %s) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version, migrated_at = excluded.migrated_at",
                (SCHEMA_VERSION, time.time()),
            )
    return found


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The recorded schema version (0: none recorded)."""
    row = conn.execute(
        "SELECT version FROM slipstream_schema WHERE component = 'prediction_log'"
        if _has_table(conn, "slipstream_schema")
        else "SELECT 0"
    ).fetchone()
    return 0 if row is None else int(row[0])


def _has_table(conn: psycopg.Connection[Any], name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone() == (True,)


class PostgresStore(BufferedStore["psycopg.Connection[Any]"]):
    """A :class:`~slipstream.monitor.store.Store` in PostgreSQL, shared by every replica that names it."""

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.time) -> None:
        if config.url is None:
            raise ConfigError(
                f"PostgresStore needs a postgresql:// URL; got the file '{config.path}'.",
                field="store.url",
                hint="Use SQLiteStore for a file, or slipstream.monitor.open_store(config) to pick one.",
            )
        self.config = config
        self.url = config.url
        self._psycopg = _psycopg()
        super().__init__(
            buffer_records=config.buffer_records,
            buffer_mb=config.buffer_mb,
            batch_records=config.batch_records,
            flush_interval_s=config.flush_interval_s,
            retention_interval_s=config.retention_interval_s,
            clock=clock,
        )
        self.degraded = not self.prepare(config)
        self._reader: psycopg.Connection[Any] | None = None
        self._read_lock = threading.Lock()
        self._start_writer()

    @staticmethod
    def prepare(config: StoreConfig) -> bool:
        """Connect and migrate the schema. An unreachable database is a ConfigError, or with
        ``degraded_start`` a logged warning and False (records wait in the buffer until it comes)."""
        pg = _psycopg()
        try:
            conn = connect(config)
        except pg.OperationalError as exc:
            where = redact(config.url or "")
            if config.degraded_start:
                log.warning(
                    "prediction log: DEGRADED START: the database at %s cannot be reached (%s); records wait in "
                    "the buffer (at most %d) and are written once it answers",
                    where,
                    str(exc).strip(),
                    config.buffer_records,
                )
                return False
            raise ConfigError(
                f"Cannot reach the prediction log's database at '{where}': {str(exc).strip()}.",
                field="store.url",
                hint="Check the host, port, user and database (the password comes from PGPASSWORD or PGPASSFILE), "
                "or start degraded with --monitor-db-degraded-start to buffer until it answers.",
            ) from exc
        try:
            migrate(conn)
        finally:
            conn.close()
        return True

    # -- the writer's hooks -----------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        conn = connect(self.config)
        if self.degraded:  # the database came after the start: its schema may not be there yet
            migrate(conn)
            self.degraded = False
            log.warning("prediction log: the database at %s answers; writing the buffered records", self.location)
        return conn

    @property
    def location(self) -> str:
        return redact(self.url)

    def _close_conn(self, conn: psycopg.Connection[Any]) -> None:
        conn.close()

    def _retryable(self, exc: Exception) -> bool:
        # OperationalError: refused, reset, admin shutdown (a restart); InterfaceError: the connection is closed.
        return isinstance(exc, self._psycopg.OperationalError | self._psycopg.InterfaceError)

    def _write(self, conn: psycopg.Connection[Any], items: list[object]) -> None:
        batches = [b for b in items if isinstance(b, PredictionBatch)]
        labels = [r for r in items if isinstance(r, Feedback)]
        snaps = [r for r in items if isinstance(r, Snapshot)]
        with conn.transaction(), conn.cursor() as cur:
            self._write_extra(cur, batches)
            if snaps:
                cur.executemany(
                    "INSERT INTO snapshots (ts, model, body) VALUES (%s, %s, %s)",
                    [(x.ts, x.model, x.body) for x in snaps],
                )
            if batches:
                cur.executemany(
                    "INSERT INTO prediction_log (ts_first, ts_last, model, version, rows, body) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    [(float(b.ts.min()), float(b.ts.max()), b.model, b.version, len(b), pack(b)) for b in batches],
                )
            if labels:
                cur.executemany(
                    "INSERT INTO feedback (request_id, label, ts) VALUES (%s, %s, %s) ON CONFLICT (request_id) "
                    "DO UPDATE SET label = excluded.label, ts = excluded.ts",
                    [(f.request_id, f.label, f.ts) for f in labels],
                )
        self._count_written(sum(len(b) for b in batches), len(labels))

    def _write_extra(self, cur: psycopg.Cursor[Any], batches: list[PredictionBatch]) -> None:
        """More statements in the same transaction as the rows (the monitor process counts them here)."""

    def _retain(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            retain(conn.execute, self.config, self._clock(), "%s")

    def run_retention(self) -> None:
        """Apply retention now (the writer also runs it every ``retention_interval_s``)."""
        conn = self._connect()
        try:
            self._retain(conn)
        finally:
            conn.close()

    # -- reading ----------------------------------------------------------------------------------

    def _read(self) -> psycopg.Connection[Any]:
        if self._reader is None or self._reader.closed:
            self._reader = connect(self.config, autocommit=True)
        return self._reader

    def _reading(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run a read on the shared reader connection, reconnecting once when the database restarted."""
        with self._read_lock:
            try:
                return fn(self._read())
            except (self._psycopg.OperationalError, self._psycopg.InterfaceError):
                if self._reader is not None:
                    self._reader.close()
                self._reader = None
                return fn(self._read())

    def labeled(
        self,
        *,
        since_ts: float | None = None,
        limit: int | None = None,
        labeled_only: bool = False,
        model: str | None = None,
        version: str | None = None,
    ) -> list[LabeledRow]:
        """Predictions (oldest first) joined with their labels, as SQLiteStore.labeled reads them."""

        def read(conn: psycopg.Connection[Any]) -> list[LabeledRow]:
            if labeled_only and conn.execute("SELECT 1 FROM feedback LIMIT 1").fetchone() is None:
                return []
            with conn.transaction():  # a server-side cursor streams the batches, newest first
                return collect_labeled(
                    read_batches(conn, since_ts=since_ts, model=model, version=version, newest_first=True),
                    lambda ids: labels_for(conn, ids),
                    since_ts=since_ts,
                    limit=limit,
                    labeled_only=labeled_only,
                    max_scan_rows=self.config.max_scan_rows,
                )

        rows: list[LabeledRow] = self._reading(read)
        return rows

    def snapshots(self, *, limit: int | None = None) -> list[Snapshot]:
        """Stored monitor summaries, oldest first (the newest ``limit`` when given)."""
        snaps: list[Snapshot] = self._reading(lambda conn: read_snapshots(conn, limit=limit))
        return snaps

    def close(self, timeout_s: float = 5.0) -> None:
        super().close(timeout_s)
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


def read_batches(
    conn: psycopg.Connection[Any],
    *,
    since_ts: float | None = None,
    model: str | None = None,
    version: str | None = None,
    newest_first: bool = False,
) -> Iterator[PredictionBatch]:
    """The logged batches, read through a server-side cursor (call inside a transaction)."""
    sql = "SELECT body FROM prediction_log"
    where, params = [], []
    for clause, value in (("ts_last >= %s", since_ts), ("model = %s", model), ("version = %s", version)):
        if value is not None:
            where.append(clause)
            params.append(value)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
    with conn.cursor(name="slipstream_batches") as cur:
        cur.itersize = 64
        cur.execute(sql, params)
        for (body,) in cur:
            yield unpack(bytes(body))


def labels_for(conn: psycopg.Connection[Any], request_ids: list[str]) -> dict[str, float]:
    """The labels that have come for these request ids (one query on the primary key)."""
    rows = conn.execute("SELECT request_id, label FROM feedback WHERE request_id = ANY(%s)", (request_ids,))
    return {str(rid): float(label) for rid, label in rows.fetchall()}


def read_snapshots(conn: psycopg.Connection[Any], *, limit: int | None = None) -> list[Snapshot]:
    """Monitor summaries, oldest first."""
    sql = "SELECT ts, model, body FROM snapshots ORDER BY seq DESC" + (" LIMIT %s" if limit is not None else "")
    rows = conn.execute(sql, (limit,) if limit is not None else ()).fetchall()
    return [Snapshot(float(ts), str(model), str(body)) for ts, model, body in reversed(rows)]


class PostgresLogReader:
    """A PostgreSQL log opened for the offline views (``slipstream monitor ... --db postgresql://...``)."""

    def __init__(self, url: str) -> None:
        pg = _psycopg()
        self.location = redact(url)
        config = StoreConfig(url=url)
        try:
            self.conn = connect(config, autocommit=True)
        except pg.OperationalError as exc:
            raise ConfigError(
                f"Cannot reach the prediction log's database at '{self.location}': {str(exc).strip()}.",
                field="db",
                hint="Check the host, port, user and database; the password comes from PGPASSWORD or PGPASSFILE.",
            ) from exc
        if not _has_table(self.conn, "prediction_log"):
            self.conn.close()
            raise ConfigError(
                f"The database at '{self.location}' holds no slipstream prediction log (no prediction_log table).",
                field="db",
                hint="Pass the URL the servers log to (--monitor-db).",
            )

    def batches(self) -> Iterator[PredictionBatch]:
        with self.conn.transaction():  # the server-side cursor lives in a transaction
            yield from read_batches(self.conn)

    def labels_for(self, request_ids: list[str]) -> dict[str, float]:
        return labels_for(self.conn, request_ids)

    def all_labels(self) -> dict[str, float]:
        rows = self.conn.execute("SELECT request_id, label FROM feedback").fetchall()
        return {str(rid): float(label) for rid, label in rows}

    def snapshots(self) -> list[Snapshot]:
        return read_snapshots(self.conn)

    def close(self) -> None:
        self.conn.close()


def _conforms(store: PostgresStore) -> Store:
    """Type-level proof (mypy) that PostgresStore implements the Store protocol."""
    return store
