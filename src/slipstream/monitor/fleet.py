"""The fleet as one model: one evaluation per model version, one alert state, one webhook call per alert.

Several replicas (``--workers``, pods, Ray Serve replicas) share one PostgreSQL prediction log. Each replica's
monitor process would otherwise evaluate on its own slice of traffic and fire its own alerts, so a drift
alert would fire (or stay quiet) per pod, and a webhook would get one call per replica. Here:

* **Election.** Each (model, version) has one *evaluator*: the replica whose dedicated connection holds the
  session-level advisory lock ``pg_try_advisory_lock(evaluation_key(model, version))``. Every evaluation
  tick, a replica that does not hold it tries to take it, so when the evaluator dies (its connection
  closes and PostgreSQL releases the lock) another takes over at its next tick. No lease, no clock: the
  database's session is the liveness signal.
* **Fencing.** The evaluator writes its snapshot and alert transitions on the very connection that holds the
  lock, and never reconnects to do so: a transaction that commits there proves the lock was still held. A
  replica whose connection broke drops the role and competes again at its next tick.
* **Alert state** is a table (``fleet_alerts``: per model, version and rule, its state and when it last
  fired and resolved). The evaluator loads it, steps the rules (:meth:`AlertManager.step`), writes the new
  state and appends the transitions to ``fleet_alert_events`` in one transaction, and sends the webhook only
  after that commit: a transition is sent once, by the replica that recorded it.
* **Followers** (the other replicas) read the evaluator's latest snapshot (``fleet_snapshots``) instead of
  computing their own, so every replica's /metrics and /dashboard show the same alerts.
* **Unreachable database.** A replica that cannot reach PostgreSQL is ``offline``: it evaluates its own
  traffic so its endpoints stay live, steps its alerts in memory and logs the transitions, but sends no
  webhook (a transition the fleet has not recorded is not sent; the evaluator sends it once the state is
  shared again).

With SQLite (one machine) no coordinator is built and nothing here runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from slipstream.errors import ConfigError, MissingDependencyError
from slipstream.monitor.alerts import AlertEvent, AlertManager, AlertState
from slipstream.monitor.fleetwindow import fleet_window, newest_rows
from slipstream.monitor.records import PredictionBatch

if TYPE_CHECKING:
    import psycopg

    from slipstream.monitor.service import Monitor
    from slipstream.monitor.store import StoreConfig

log = logging.getLogger("slipstream.monitor")

Key = tuple[str, str]
Role = Literal["evaluator", "follower", "offline"]

SCHEMA_LOCK = 0x51195_7EA_F1EE7  # serializes CREATE TABLE IF NOT EXISTS across replicas starting together

SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_snapshots (
    model TEXT NOT NULL, version TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, evaluator TEXT NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS fleet_alerts (
    model TEXT NOT NULL, version TEXT NOT NULL, rule TEXT NOT NULL, metric TEXT NOT NULL, state TEXT NOT NULL,
    since DOUBLE PRECISION, value DOUBLE PRECISION, low DOUBLE PRECISION, high DOUBLE PRECISION,
    reason TEXT NOT NULL, fired_at DOUBLE PRECISION, resolved_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL, evaluator TEXT NOT NULL, PRIMARY KEY (model, version, rule)
);
ALTER TABLE fleet_alerts ADD COLUMN IF NOT EXISTS clearing_since DOUBLE PRECISION;
CREATE TABLE IF NOT EXISTS fleet_alert_events (
    seq BIGSERIAL PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, rule TEXT NOT NULL,
    state TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, evaluator TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_alert_events_key ON fleet_alert_events (model, version, seq);
"""
"""The fleet's tables, beside the prediction log's in the same database."""

_UPSERT_ALERT = """
INSERT INTO fleet_alerts (model, version, rule, metric, state, since, value, low, high, reason, clearing_since,
                          fired_at, resolved_at, updated_at, evaluator)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (model, version, rule) DO UPDATE SET
    metric = excluded.metric, state = excluded.state, since = excluded.since, value = excluded.value,
    low = excluded.low, high = excluded.high, reason = excluded.reason, clearing_since = excluded.clearing_since,
    fired_at = COALESCE(excluded.fired_at, fleet_alerts.fired_at),
    resolved_at = COALESCE(excluded.resolved_at, fleet_alerts.resolved_at),
    updated_at = excluded.updated_at, evaluator = excluded.evaluator
"""

_STATE_COLUMNS = "rule, metric, state, since, value, low, high, reason, clearing_since"
"""fleet_alerts' columns that make an AlertState, in its field names."""


def lock_key(kind: str, model: str, version: str) -> int:
    """A signed 64-bit advisory-lock key for (kind, model, version), stable across processes and machines
    (Python's ``hash`` is salted per process, so it would elect nobody)."""
    digest = hashlib.blake2b(f"slipstream\0{kind}\0{model}\0{version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def evaluation_key(model: str, version: str) -> int:
    """The advisory lock whose holder evaluates this model version for the fleet."""
    return lock_key("evaluate", model, version)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # an optional extra: only fleets on PostgreSQL need it
        raise MissingDependencyError("psycopg", extra="postgres", feature="A fleet on PostgreSQL") from exc
    return psycopg


class FleetCoordinator:
    """One replica's seat in the fleet: see the module docstring. Thread-safe (one lock around its connection).

    ``name`` identifies this replica in the tables (host:pid by default)."""

    def __init__(
        self,
        dsn: str,
        *,
        name: str | None = None,
        connect_timeout_s: float = 5.0,
        required: bool = True,
        events_max_age_s: float | None = None,
    ) -> None:
        self.dsn = dsn
        self.events_max_age_s = events_max_age_s  # alert transitions older than this go when a new one comes
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.connect_timeout_s = connect_timeout_s
        self._pg = _psycopg()
        self._lock = threading.Lock()
        self._held: set[Key] = set()
        self._conn: psycopg.Connection[Any] | None = None
        self.last_error: str | None = None
        self._retry_at = self._backoff_s = 0.0
        self._connect_error = ""
        try:
            self._connection()
        except self._pg.Error as exc:
            if not required:  # a degraded start, by setting: offline until the database answers
                self._lost(exc)
                log.warning("fleet: database unreachable at start, evaluating locally until it answers: %s", exc)
                return
            raise ConfigError(
                f"Cannot reach the fleet's PostgreSQL database to coordinate evaluation: {exc}".strip(),
                field="store",
                hint="Check the DSN (host, port, database, user; the password comes from PGPASSWORD or "
                "PGPASSFILE) and that the server accepts connections from this host.",
            ) from exc

    # -- the connection that holds the locks --------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """The lock's connection, connecting when there is none. Attempts back off (1 s doubling to 60 s): a
        connect to an away database blocks the monitor process's loop for up to ``connect_timeout_s``."""
        if self._conn is None or self._conn.closed:
            self._held.clear()  # a new session holds no lock
            if time.monotonic() < self._retry_at:
                raise self._pg.OperationalError(f"the fleet's database is away ({self._connect_error})")
            conn = None
            try:
                conn = self._pg.connect(
                    self.dsn, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s)),
                    application_name=f"slipstream-fleet {self.name}"[:63],
                )  # fmt: skip
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    conn.execute(SCHEMA)
            except self._pg.Error as exc:
                if conn is not None:
                    conn.close()
                self._connect_error = f"{type(exc).__name__}: {exc}".strip()
                self._backoff_s = min(60.0, max(1.0, 2 * self._backoff_s))
                self._retry_at = time.monotonic() + self._backoff_s
                raise
            self._conn, self._backoff_s = conn, 0.0
        return self._conn

    def _lost(self, exc: Exception) -> None:
        """A statement failed. On a broken connection whatever it held is released by the server: drop the
        roles and compete again next tick (a failed statement on a live connection keeps them)."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._conn is not None and not self._conn.broken and not self._conn.closed:
            log.warning("fleet: a statement failed: %s", self.last_error)
            return
        if self._held:
            log.warning("fleet: lost the evaluator role for %s: %s", sorted(self._held), self.last_error)
        self._held.clear()
        if self._conn is not None:
            with contextlib.suppress(self._pg.Error):  # already broken: the session is gone either way
                self._conn.close()
        self._conn = None

    # -- election -------------------------------------------------------------------------------------

    def role(self, key: Key) -> Role:
        """This replica's role for a model version now: take the evaluator's lock when it is free."""
        with self._lock:
            try:
                conn = self._connection()
                if key in self._held:
                    conn.execute("SELECT 1")  # still connected, so still holding (fencing: see the docstring)
                    return "evaluator"
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (evaluation_key(*key),)).fetchone()
            except self._pg.Error as exc:
                self._lost(exc)
                return "offline"
            if row is not None and row[0]:
                self._held.add(key)
                log.info("fleet: %s evaluates %s version %s for the fleet", self.name, *key)
                return "evaluator"
            return "follower"

    def is_evaluator(self, key: Key) -> bool:
        return self.role(key) == "evaluator"

    def resign(self, key: Key) -> None:
        """Give up the evaluator role for a version this replica stops serving (another takes it next tick)."""
        with self._lock:
            if key not in self._held or self._conn is None:
                return
            self._held.discard(key)
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (evaluation_key(*key),))
            except self._pg.Error as exc:
                self._lost(exc)

    def evaluator(self, key: Key) -> str | None:
        """The name of the replica that last published this version's snapshot (None: none yet)."""
        row = self._read("SELECT evaluator FROM fleet_snapshots WHERE model = %s AND version = %s", key)
        return None if not row else str(row[0][0])

    # -- snapshots ------------------------------------------------------------------------------------

    def _held_connection(self, key: Key) -> psycopg.Connection[Any] | None:
        """The lock's connection when this replica evaluates ``key``, never a new one (fencing)."""
        if key not in self._held or self._conn is None or self._conn.closed:
            return None
        return self._conn

    def publish(self, key: Key, snapshot_json: str, at: float) -> bool:
        """Store the evaluator's latest snapshot for the followers; False when this replica is not (or no
        longer) the evaluator."""
        with self._lock:
            conn = self._held_connection(key)
            if conn is None:
                return False
            try:
                conn.execute(
                    "INSERT INTO fleet_snapshots (model, version, at, evaluator, body) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (model, version) DO UPDATE SET at = excluded.at, evaluator = excluded.evaluator, "
                    "body = excluded.body",
                    (*key, at, self.name, snapshot_json),
                )
            except self._pg.Error as exc:
                self._lost(exc)
                return False
            return True

    def latest(self, key: Key) -> str | None:
        """The fleet's latest snapshot of a version as JSON (None: none yet, or the database is unreachable)."""
        rows = self._read("SELECT body FROM fleet_snapshots WHERE model = %s AND version = %s", key)
        return None if not rows else str(rows[0][0])

    def _read(self, sql: str, params: Iterable[object]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._connection().execute(sql, tuple(params)).fetchall())
            except self._pg.Error as exc:
                self._lost(exc)
                return []

    def recent_batches(self, key: Key, rows: int) -> list[PredictionBatch]:
        """The newest logged batches of a version (every replica's) holding ``rows`` rows, oldest first: the
        fleet's drift window (slipstream.monitor.fleetwindow). [] when the database cannot be read."""
        from slipstream.monitor.store_pg import read_batches

        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():  # read_batches streams through a server-side cursor
                    return newest_rows(read_batches(conn, model=key[0], version=key[1], newest_first=True), rows)
            except self._pg.Error as exc:
                self._lost(exc)
                return []

    # -- alerts ---------------------------------------------------------------------------------------

    def alerts(self, key: Key) -> list[AlertState]:
        """The fleet's alert states for a version, as every replica shows them."""
        rows = self._read(
            f"SELECT {_STATE_COLUMNS} FROM fleet_alerts WHERE model = %s AND version = %s ORDER BY rule",
            key,
        )
        return [_state(row) for row in rows]

    def events(self, key: Key) -> list[AlertEvent]:
        """Every transition the fleet recorded (and sent) for a version, oldest first."""
        rows = self._read("SELECT body FROM fleet_alert_events WHERE model = %s AND version = %s ORDER BY seq", key)
        return [AlertEvent.model_validate_json(row[0]) for row in rows]

    def update_alerts(
        self, key: Key, manager: AlertManager, metrics: Mapping[str, float | None], now: float
    ) -> list[AlertEvent]:
        """Step the fleet's alert state with the evaluator's metrics: load, step, store the state and the
        transitions in one transaction, and notify (log, webhook) only after it committed. Not the evaluator
        (or the transaction failed): step the local state only, log, send nothing (see the module docstring)."""
        with self._lock:
            conn = self._held_connection(key)
            if conn is not None:
                try:
                    with conn.transaction():
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("alerts", *key),))
                        rows = conn.execute(
                            f"SELECT {_STATE_COLUMNS} FROM fleet_alerts WHERE model = %s AND version = %s",
                            key,
                        ).fetchall()
                        manager.load(_state(row) for row in rows)
                        events = manager.step(metrics, now)
                        _store(conn, key, manager.states(), events, now, self.name)
                        if events and self.events_max_age_s is not None:  # the table grows only here
                            conn.execute(
                                "DELETE FROM fleet_alert_events WHERE model = %s AND version = %s AND at < %s",
                                (*key, now - self.events_max_age_s),
                            )
                except self._pg.Error as exc:
                    self._lost(exc)
                else:
                    manager.notify(events)
                    return events
        events = manager.step(metrics, now)
        for e in events:
            log.warning("fleet: alert %s %s not sent: the fleet's database did not record it (%s)",
                        e.rule, e.state, self.last_error or "this replica is not the evaluator")  # fmt: skip
        return events

    def join(self, key: Key, monitor: Monitor) -> None:
        """Route a monitor's alert state through the fleet's database, and its drift window through the log
        every replica writes (slipstream.monitor.fleetwindow)."""
        rows, ood = monitor.config.window_rows, monitor.config.threats.ood_threshold
        monitor.share_alerts = partial(self.update_alerts, key)
        monitor.window_source = lambda local: fleet_window(local, self.recent_batches(key, rows), rows, ood)

    def evaluate(self, key: Key, monitor: Monitor) -> str:
        """One evaluation tick of a joined monitor, as JSON: the evaluator evaluates and publishes; a follower
        takes the evaluator's latest snapshot with its own counters (:meth:`Monitor.follow`); before the first
        snapshot, or while the database is away, a replica evaluates its own traffic."""
        role = self.role(key)
        if role == "follower" and (fleet_json := self.latest(key)) is not None:
            return monitor.follow(fleet_json).model_dump_json()
        snap = monitor.evaluate()
        doc = snap.model_dump_json()
        if role == "evaluator":
            self.publish(key, doc, snap.at)
        return doc

    def close(self) -> None:
        """Close the connection; the server releases every lock it held."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            self._held.clear()


def coordinator(store: StoreConfig | None) -> FleetCoordinator | None:
    """The coordinator for a log a fleet shares (a PostgreSQL URL); None for a SQLite file (one machine)."""
    if store is None or store.url is None:
        return None
    return FleetCoordinator(
        store.url,
        connect_timeout_s=store.connect_timeout_s,
        required=not store.degraded_start,
        events_max_age_s=store.max_age_s,
    )


def _state(row: tuple[Any, ...]) -> AlertState:
    return AlertState.model_validate(dict(zip(_STATE_COLUMNS.split(", "), row, strict=True)))


def _store(
    conn: psycopg.Connection[Any],
    key: Key,
    states: list[AlertState],
    events: list[AlertEvent],
    now: float,
    name: str,
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            _UPSERT_ALERT,
            [
                (
                    *key,
                    s.rule,
                    s.metric,
                    s.state,
                    s.since,
                    s.value,
                    s.low,
                    s.high,
                    s.reason,
                    s.clearing_since,
                    s.since if s.state == "firing" else None,
                    s.since if s.state == "resolved" else None,
                    now,
                    name,
                )
                for s in states
            ],
        )
        if events:
            cur.executemany(
                "INSERT INTO fleet_alert_events (model, version, rule, state, at, evaluator, body) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(*key, e.rule, e.state, e.at, name, e.model_dump_json()) for e in events],
            )
