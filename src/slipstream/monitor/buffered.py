"""The bounded buffer and the writer thread that every prediction-log store shares.

A store is this base plus four hooks: how to connect, how to write a list of queued items in one
transaction, how to apply retention, and which failures are worth retrying. Puts never block and never
raise: a full buffer, a closed store or a failed write drops the records and counts them by reason. A
*retryable* failure (a database that restarts or cannot be reached) is not a drop: the writer keeps the
items it took, backs off (doubling up to ``retry_max_s``) and writes them after it reconnects, while new
records wait in the bounded buffer and what does not fit is dropped as ``buffer_full``. So
``accepted = written + dropped + pending`` holds at every moment, whatever the database does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, Literal, TypeVar

from slipstream.monitor.records import Feedback, PredictionBatch, PredictionRecord, Snapshot

log = logging.getLogger("slipstream.monitor.store")

DropReason = Literal["buffer_full", "db_error", "closed"]
C = TypeVar("C")


class BufferedStore(Generic[C]):
    """A bounded queue drained by one writer thread; subclasses supply the connection ``C`` and the SQL.

    ``buffer_records``/``buffer_mb``/``batch_records``/``flush_interval_s``/``retention_interval_s`` come
    from the store's config; ``retry_initial_s``/``retry_max_s`` bound the backoff of retryable failures."""

    retry_initial_s = 0.1
    retry_max_s = 5.0

    def __init__(
        self,
        *,
        buffer_records: int,
        buffer_mb: float,
        batch_records: int,
        flush_interval_s: float,
        retention_interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._buffer_records = buffer_records
        self._batch_records = batch_records
        self._flush_interval_s = flush_interval_s
        self._retention_interval_s = retention_interval_s
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
        self._max_bytes = int(buffer_mb * 1e6)
        self.last_error: str | None = None
        self.retries = 0  # failed attempts that were retried (the database was away)
        self._closed = False
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._last_retention = clock()
        self._thread = threading.Thread(target=self._run, name="slipstream-store-writer", daemon=True)

    def _start_writer(self) -> None:
        """Subclasses call this at the end of their ``__init__``, once they can connect."""
        self._last_retention = self._clock()
        self._thread.start()

    # -- hooks ------------------------------------------------------------------------------------

    def _connect(self) -> C:
        raise NotImplementedError

    def _write(self, conn: C, items: list[object]) -> None:
        """Write ``items`` in one transaction and count them (``_count_written``) once it committed."""
        raise NotImplementedError

    def _retain(self, conn: C) -> None:
        raise NotImplementedError

    def _close_conn(self, conn: C) -> None:
        raise NotImplementedError

    def _retryable(self, exc: Exception) -> bool:
        """True when ``exc`` means the database is away (the items are kept and retried), not that the
        items cannot be written (they are dropped as ``db_error``)."""
        return False

    def _count_written(self, predictions: int, feedback: int) -> None:
        with self._lock:
            self._written["predictions"] += predictions
            self._written["feedback"] += feedback

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
            if self._queued + rows > self._buffer_records or self._queued_bytes + size > self._max_bytes:
                self._dropped["buffer_full"] += rows
                return 0
            self._queued += rows
            self._queued_bytes += size
            busy = self._queued * 4 >= self._buffer_records or self._queued_bytes * 4 >= self._max_bytes
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
            room = min(self._buffer_records - self._queued, int((self._max_bytes - self._queued_bytes) * n // size))
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
        while self._buf and (not items or rows < self._batch_records):
            item, n, nbytes = self._buf.popleft()
            items.append(item)
            rows += n
            size += nbytes
        return items, rows, size

    def _run(self) -> None:
        # Wake every flush interval (or when flush/close asks) and drain the queue: one transaction per
        # ``batch_records`` records, and no thread switch per put.
        conn: C | None = None
        while True:
            self._wake.wait(self._flush_interval_s)
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
            if self._clock() - self._last_retention >= self._retention_interval_s:
                self._last_retention = self._clock()
                conn = self._write_batch(conn, [], 0)
            if stopping:
                break
        if conn is not None:
            self._close_conn(conn)

    def _write_batch(self, conn: C | None, items: list[object], rows: int) -> C | None:
        """Write queued items (none: run retention). A retryable failure keeps them and tries again with
        backoff until it succeeds or the store closes; any other failure drops and counts them."""
        delay = self.retry_initial_s
        try:
            while True:
                try:
                    if conn is None:
                        conn = self._connect()
                    if items:
                        self._write(conn, items)
                    else:
                        self._retain(conn)
                    return conn
                except Exception as exc:  # the writer must outlive any failure; every loss is counted
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if conn is not None:
                        self._close_quietly(conn)
                    conn = None
                    if not items:
                        log.warning("prediction log: retention failed: %s", self.last_error)
                        return None
                    if not self._retryable(exc) or self._closed:
                        reason: DropReason = "closed" if self._closed and self._retryable(exc) else "db_error"
                        log.warning("prediction log: dropped %d record(s): %s", rows, self.last_error)
                        self._drop(reason, rows)
                        return None
                    self.retries += 1
                    if self.retries == 1 or delay >= self.retry_max_s:
                        log.warning("prediction log: database away, retrying in %.1f s: %s", delay, self.last_error)
                    self._sleep(delay)
                    delay = min(self.retry_max_s, delay * 2)
        finally:
            with self._idle:
                self._inflight = 0
                self._idle.notify_all()

    def _sleep(self, seconds: float) -> None:
        """Back off, but wake at once when the store closes."""
        deadline = time.monotonic() + seconds
        while not self._closed and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def _close_quietly(self, conn: C) -> None:
        try:
            self._close_conn(conn)
        except Exception as exc:  # a broken connection may fail to close; it is dropped either way
            log.debug("prediction log: closing a broken connection failed: %s", exc)

    # -- reading and lifecycle --------------------------------------------------------------------

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
