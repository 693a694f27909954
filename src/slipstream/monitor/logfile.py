"""Reading a prediction log file: its batches, its records joined with their labels, its summaries.

The server's :class:`~slipstream.monitor.store.SQLiteStore` reads through these, and so do the offline
report and ``slipstream monitor export``, on a read-only connection of their own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

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
