"""Reading a prediction log file: its batches, its records joined with their labels, its summaries.

The server's :class:`~slipstream.monitor.store.SQLiteStore` reads through these, and so do the offline
report and ``slipstream monitor export``, on a read-only connection of their own. :func:`collect_labeled`
(the join of predictions and labels) is shared with the PostgreSQL store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import orjson

from slipstream.errors import ConfigError
from slipstream.monitor.records import LabeledRow, PredictionBatch, PredictionRecord, Snapshot, unpack


def refuse_legacy(conn: sqlite3.Connection, path: Path, *, field: str) -> None:
    """ConfigError when the file is a log an earlier slipstream wrote (one ``predictions`` row per request):
    this version neither reads nor extends it, and must not mix the two."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "predictions" in tables and "prediction_log" not in tables:
        rows = conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
        raise ConfigError(
            f"'{path}' is a prediction log written by an earlier slipstream ({rows} rows, one per request); "
            "this version logs one row per batch of requests and does not read that format.",
            field=field,
            hint="Log to a new file; the old log stays readable with the slipstream version that wrote it.",
        )


def read_batches(
    conn: sqlite3.Connection,
    *,
    since_ts: float | None = None,
    model: str | None = None,
    version: str | None = None,
    newest_first: bool = False,
) -> Iterator[PredictionBatch]:
    """The logged batches (oldest first unless ``newest_first``), read one at a time; ``since_ts`` skips
    batches that end before it (a batch that straddles it comes whole)."""
    sql = "SELECT body FROM prediction_log"
    where, params = [], []
    for clause, value in (("ts_last >= ?", since_ts), ("model = ?", model), ("version = ?", version)):
        if value is not None:
            where.append(clause)
            params.append(value)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
    for (body,) in conn.execute(sql, params):
        yield unpack(body)


def read_records(path: Path, *, timeout_s: float = 1.0) -> list[PredictionRecord]:
    """Every logged prediction in a log file, one record per row, oldest first (for exports and tests)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s)
    try:
        return [record for batch in read_batches(conn) for record in batch.records()]
    finally:
        conn.close()


def labels_for(conn: sqlite3.Connection, request_ids: list[str]) -> dict[str, float]:
    """The labels that have come for these request ids (one indexed query)."""
    rows = conn.execute(
        "SELECT request_id, label FROM feedback WHERE request_id IN (SELECT value FROM json_each(?))",
        (orjson.dumps(request_ids).decode(),),
    )
    return dict(rows.fetchall())


def labeled_rows(
    batch: PredictionBatch, labels: dict[str, float], *, since_ts: float | None, labeled_only: bool
) -> list[LabeledRow]:
    """The batch's rows at or after ``since_ts`` (those with a label only, when asked) as LabeledRows."""
    keep = np.ones(len(batch), dtype=bool)
    if since_ts is not None:
        keep &= batch.ts >= since_ts
    if labeled_only:
        keep &= np.fromiter((rid in labels for rid in batch.request_ids), dtype=bool, count=len(batch))
    idx = np.flatnonzero(keep).tolist()

    def col(values: np.ndarray | None) -> list[float | None]:
        if values is None:
            return [None] * len(idx)
        return [None if v != v else v for v in values[idx].tolist()]  # NaN: none

    ids = [batch.request_ids[i] for i in idx]
    return [
        LabeledRow(rid, ts, pred, conf, labels.get(rid), grp, key, lat, ood)
        for rid, ts, pred, conf, grp, key, lat, ood in zip(
            ids, batch.ts[idx].tolist(), col(batch.prediction), col(batch.confidence),
            [batch.groups[i] for i in idx], [batch.key_ids[i] for i in idx], batch.latency_ms[idx].tolist(),
            col(batch.ood_score), strict=True,
        )
    ]  # fmt: skip


def collect_labeled(
    batches: Iterable[PredictionBatch],
    labels_of: Callable[[list[str]], dict[str, float]],
    *,
    since_ts: float | None,
    limit: int | None,
    labeled_only: bool,
    max_scan_rows: int,
) -> list[LabeledRow]:
    """Rows of ``batches`` (given newest first) joined with their labels, returned oldest first: what
    ``Store.labeled`` means for every store. ``limit`` keeps the newest ``limit`` rows, and then the read
    looks back through at most ``max(limit, max_scan_rows)`` rows."""
    chunks: list[list[LabeledRow]] = []  # newest first
    total = scanned = 0
    budget = None if limit is None else max(limit, max_scan_rows)
    for batch in batches:
        labels = labels_of(batch.request_ids)
        if labels or not labeled_only:
            keep = labeled_rows(batch, labels, since_ts=since_ts, labeled_only=labeled_only)
            chunks.append(keep)
            total += len(keep)
        scanned += len(batch)
        if limit is not None and (total >= limit or (budget is not None and scanned >= budget)):
            break
    out = [r for chunk in reversed(chunks) for r in chunk]
    return out[len(out) - limit :] if limit is not None and len(out) > limit else out


def read_snapshots(path: Path, *, limit: int | None = None, timeout_s: float = 1.0) -> list[Snapshot]:
    """Monitor summaries from a prediction log file (also usable offline, by the report)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s)
    try:
        sql = "SELECT ts, model, body FROM snapshots ORDER BY seq DESC"
        params: tuple[int, ...] = (limit,) if limit is not None else ()
        rows = conn.execute(sql + (" LIMIT ?" if limit is not None else ""), params).fetchall()
    finally:
        conn.close()
    return [Snapshot(*row) for row in reversed(rows)]


class LogReader(Protocol):
    """A prediction log opened for reading by the offline views (``slipstream monitor status|report|export``),
    whatever holds it: a SQLite file (:class:`SQLiteLogReader`) or PostgreSQL (``store_pg.PostgresLogReader``)."""

    location: str

    def batches(self) -> Iterator[PredictionBatch]: ...
    def labels_for(self, request_ids: list[str]) -> dict[str, float]: ...
    def all_labels(self) -> dict[str, float]: ...
    def snapshots(self) -> list[Snapshot]: ...
    def close(self) -> None: ...


class SQLiteLogReader:
    """A SQLite log file, opened read-only; ConfigError when it is missing or not a slipstream log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        if not path.is_file():
            raise ConfigError(
                f"No prediction log at '{path}'.",
                field="db",
                hint="Pass the SQLite file the server logs to, or its postgresql:// URL (--db).",
            )
        try:
            self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
            refuse_legacy(self.conn, path, field="db")
            self.conn.execute("SELECT 1 FROM prediction_log LIMIT 1")
        except sqlite3.Error as exc:
            raise ConfigError(
                f"'{path}' is not a slipstream prediction log ({exc}).",
                field="db",
                hint="Pass the SQLite file the server logs to.",
            ) from exc

    def batches(self) -> Iterator[PredictionBatch]:
        return read_batches(self.conn)

    def labels_for(self, request_ids: list[str]) -> dict[str, float]:
        return labels_for(self.conn, request_ids)

    def all_labels(self) -> dict[str, float]:
        return dict(self.conn.execute("SELECT request_id, label FROM feedback").fetchall())

    def snapshots(self) -> list[Snapshot]:
        return read_snapshots(self.path)

    def close(self) -> None:
        self.conn.close()


def open_log(db: str | Path) -> LogReader:
    """The log at ``db`` (a file path or a postgresql:// URL, parsed by slipstream.monitor.location)."""
    from slipstream.monitor.location import parse_location

    where = parse_location(db, field="db")
    if isinstance(where, Path):
        return SQLiteLogReader(where)
    from slipstream.monitor.store_pg import PostgresLogReader

    return PostgresLogReader(where)
