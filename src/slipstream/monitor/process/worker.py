"""The monitor process: every monitor of one server, their shared prediction log and their evaluations.

The server ships what it served here (:class:`slipstream.monitor.ingest.Columns`, every 50 ms) and this
process does the rest on its own core and its own GIL: features, the drift window, out-of-distribution
scores, the extraction watch, the prediction-log records and their SQLite writes, and an evaluation of each
monitor every ``evaluate_interval_s`` (sent back to the server as JSON). Measured in one process, that work
cost the server 47 µs of CPU per request at 64 connections (its own cost was 78 µs), most of it in the
event loop and the log writer trading the GIL; see ``benchmarks/results/monitoring.md``.

The protocol, over one duplex pipe, in order (the server sends from one thread, so order is kept):

    server → here   ("attach", token, (model, version), bundle_dir, profile)  build a version's Monitor
                    ("detach", token, (model, version))               close it; the log stays open
                    ("batch", (model, version), [Columns], counts)    served requests + counter deltas
                    ("feedback", (model, version), [Feedback])        labels
                    ("evaluate", token, (model, version))             evaluate now, reply with the JSON
                    ("flush", token)                                  write what was taken, reply, ack
                    ("close", token)                                  close everything, reply, exit
    here → server   ("idle",)                                         once imported, before the settings
                    ("ready",) or ("failed", message)                 once, at start
                    ("reply", token, ok, payload)                     to each message with a token
                    ("ack", written, {reason: dropped})               the rows settled so far (cumulative)
                    ("snapshot", (model, version), json)              after each periodic evaluation
                    ("log", logger name, level, message)              this process's log records

Before all that, the server sends ``(settings JSON, run id)``. Every row of every batch ends in exactly one
count of the acknowledgement: written, or dropped for a reason (``not_sampled``, ``ingest_error``,
``buffer_full``, ``disk_full``, ``db_error``, ``no_monitor``, ``closed``); see
:mod:`slipstream.monitor.process.accounting` for how the server turns them into exact totals.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from slipstream.logs import RateLimitFilter
from slipstream.monitor import (
    FairnessConfig,
    Monitor,
    MonitorConfig,
    Profile,
    QualityConfig,
    StoreConfig,
    ThreatConfig,
)
from slipstream.monitor.alerts import DEFAULT_RULES, AlertRule, AlertsConfig
from slipstream.monitor.drift import load_statistics
from slipstream.monitor.ingest import Columns
from slipstream.monitor.process.accounting import AccountedStore
from slipstream.monitor.process.placement import parse_cpu_list, pin_thread
from slipstream.serve.settings import MonitorSettings

log = logging.getLogger("slipstream.monitor")

Key = tuple[str, str]


def _rules(s: MonitorSettings) -> tuple[AlertRule, ...]:
    thresholds = {
        "accuracy_drop": s.accuracy_drop_threshold,
        "estimated_accuracy_drop": s.accuracy_drop_threshold,
        "demographic_parity": s.fairness_max_difference,
        "equalized_odds": s.fairness_max_difference,
        "demographic_parity_ratio": s.fairness_min_ratio,
    }
    out = []
    for rule in DEFAULT_RULES:
        value = thresholds.get(rule.name)
        out.append(rule if value is None else rule.model_copy(update={"threshold": value}))
    return tuple(out)


def monitor_config(s: MonitorSettings) -> MonitorConfig:
    """The library's config from the server's flat settings."""
    return MonitorConfig(
        sample_rate=s.sample_rate,
        log_raw_inputs=s.log_raw_inputs,
        window_rows=s.window_rows,
        evaluate_interval_s=s.evaluate_interval_s,
        quality=QualityConfig(
            window_rows=s.quality_window_rows, min_labeled=s.min_labeled, max_accuracy_drop=s.accuracy_drop_threshold
        ),
        fairness=FairnessConfig(
            positive_label=s.fairness_positive_label,
            max_difference=s.fairness_max_difference,
            min_ratio=s.fairness_min_ratio,
            confidence=s.fairness_confidence,
        ),
        threats=ThreatConfig(ood_threshold=s.ood_threshold, reject_ood_above=s.ood_reject_above),
        alerts=AlertsConfig(rules=_rules(s), webhook_url=s.webhook_url),
    )


def store_config(s: MonitorSettings) -> StoreConfig:
    if s.db_path is None:
        raise ValueError("monitoring needs MonitorSettings.db_path")
    return StoreConfig(path=s.db_path, max_age_s=s.retention_max_age_s, max_rows=s.retention_max_rows)


class _ToServer(logging.Handler):
    """Sends this process's log records to the server, which logs them as its own (JSON logs included)."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(logging.INFO)
        self._worker = worker
        # A persistent fault (a full disk fails every write, five a second) is one line, then a count.
        self.addFilter(RateLimitFilter())

    def emit(self, record: logging.LogRecord) -> None:
        # When the server is gone (this process is closing) there is no one left to tell.
        with contextlib.suppress(Exception):
            self._worker.send(("log", record.name, record.levelno, self.format(record)))


class Worker:
    """One per server; see the module docstring."""

    def __init__(self, conn: Connection, settings: MonitorSettings, run: str = "") -> None:
        self.conn = conn
        self.settings = settings
        self.config = monitor_config(settings)
        self._send_lock = threading.Lock()  # the webhook thread logs too: one message at a time on the pipe
        cap = None if settings.log_max_mb is None else int(settings.log_max_mb * 1e6)
        self.store = AccountedStore(store_config(settings), run=run, max_bytes=cap)
        self.monitors: dict[Key, Monitor] = {}
        self._due: dict[Key, float] = {}
        self.dropped = dict.fromkeys(("not_sampled", "ingest_error", "buffer_full", "no_monitor", "closed"), 0)
        self._acked: tuple[int, dict[str, int]] | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self.conn.send(message)

    def run(self) -> None:
        """Serve messages until the server says close (or goes away), evaluating on schedule."""
        while True:
            now = time.monotonic()
            wait = max(0.0, min(self._due.values(), default=now + 1.0) - now)
            if self.store.settled()[2]:  # rows on their way to the log: acknowledge them soon after
                wait = min(wait, 0.05)
            try:
                message = self.conn.recv() if self.conn.poll(wait) else None
            except (EOFError, OSError):  # the server died: write what was shipped, then stop
                log.error("the server went away; the monitor process writes what it has and exits")
                break
            if message is not None:
                try:
                    if self.handle(message):
                        return
                except Exception as exc:  # one bad message must not stop monitoring; logged with its traceback
                    log.exception("monitor process: %s failed: %s", message[0], exc)
            self._evaluate_due()
            self.ack()
        self._close()

    def accounting(self) -> tuple[int, dict[str, int]]:
        """Rows written and rows dropped by reason, so far (see the module docstring)."""
        written, failed, _ = self.store.settled()
        return written, {**self.dropped, **failed}

    def ack(self) -> None:
        """Tell the server what was settled since the last acknowledgement (nothing when nothing was)."""
        now = self.accounting()
        if now != self._acked:
            self.send(("ack", *now))
            self._acked = now

    def handle(self, message: tuple[Any, ...]) -> bool:
        """Act on one message; True when it was ``close``."""
        kind = message[0]
        if kind == "batch":
            _, key, batches, counts = message
            self._ingest(key, batches, counts)
        elif kind == "feedback":
            self.store.put_feedback(message[2])
        elif kind in ("attach", "detach", "evaluate", "flush", "close"):
            token = message[1]
            try:
                payload = getattr(self, f"_{kind}")(*message[2:])
            except Exception as exc:
                log.exception("monitor process: %s failed: %s", kind, exc)
                self.send(("reply", token, False, f"{type(exc).__name__}: {exc}"))
            else:
                self.send(("reply", token, True, payload))
            return bool(kind == "close")
        else:
            log.error("monitor process: unknown message %r ignored", kind)
        return False

    def _ingest(self, key: Key, batches: list[Columns], counts: dict[str, Any]) -> None:
        mon = self.monitors.get(key)
        if mon is None:
            lost = sum(c.requests for c in batches)
            self.dropped["no_monitor"] += sum(int(c.counts.sum()) for c in batches)
            log.error("monitor process: %d request(s) of %s version %s arrived after its monitor closed", lost, *key)
            return
        mon.counters.add(counts["security"])
        mon.screen_errors += counts["screen_errors"]
        ing = mon.ingestor
        ing.dropped += counts["dropped"]
        ing.errors += counts["errors"]
        for cols in batches:
            # The fate of each row: the ingestor counts a failed batch in ``errors`` and the sampled rows in
            # ``sampled``; the store counts the rows it accepted (the rest found its buffer full).
            rows, errors, sampled = int(cols.counts.sum()), ing.errors, ing.sampled
            accepted = self.store.counts()["accepted_predictions"]
            ing.ingest(cols)
            if ing.errors != errors:
                self.dropped["ingest_error"] += rows
                continue
            took = ing.sampled - sampled
            self.dropped["not_sampled"] += rows - took
            self.dropped["buffer_full"] += took - (self.store.counts()["accepted_predictions"] - accepted)

    def _attach(self, key: Key, bundle_dir: str, profile: Profile | None) -> None:
        """The server read the profile (it screens with it) and sends it: no second read, one error path."""
        self.monitors[key] = Monitor(
            model=key[0], version=key[1], profile=profile, store=self.store, config=self.config, bundle_dir=bundle_dir
        )
        self._due[key] = time.monotonic() + self.config.evaluate_interval_s

    def _detach(self, key: Key) -> None:
        mon = self.monitors.pop(key, None)
        self._due.pop(key, None)
        if mon is not None:
            mon.close(close_store=False)

    def _evaluate(self, key: Key) -> str:
        mon = self.monitors.get(key)
        if mon is None:
            raise KeyError(f"no monitor for {key[0]} version {key[1]}")
        return mon.evaluate().model_dump_json()

    def _evaluate_due(self) -> None:
        now = time.monotonic()
        for key, due in list(self._due.items()):
            if due > now:
                continue
            self._due[key] = now + self.config.evaluate_interval_s
            try:
                self.send(("snapshot", key, self._evaluate(key)))
            except Exception as exc:  # keep monitoring; logged with its traceback
                log.exception("monitor evaluation of %s version %s failed: %s", *key, exc)

    def _flush(self) -> tuple[int, dict[str, int]]:
        """Write what was taken so far, then acknowledge it (so the server's accounting is settled)."""
        self.store.flush()
        self.ack()
        return self.accounting()

    def _close(self) -> dict[str, int]:
        for key in list(self.monitors):
            self._detach(key)
        self.store.close()
        self.dropped["closed"] += self.store.settled()[2]  # raced with the close: counted, never gone
        with contextlib.suppress(Exception):  # the server may be gone already
            self.ack()
        return self.store.counts()


def niceness(settings: MonitorSettings) -> int:
    """The monitor process's niceness: ``process_nice`` more than the server's (whose child it is)."""
    return min(19, os.getpriority(os.PRIO_PROCESS, os.getppid()) + settings.process_nice)


def run_worker(conn: Connection, cpus: frozenset[int] | None = None) -> None:
    """Serve one server until it closes: the first message is its MonitorSettings as JSON and this run's id
    (see slipstream.monitor.process.accounting). ``cpus``: where to
    run (slipstream.monitor.process.placement), set with the niceness before any thread starts."""
    # Importing scipy took ~1 s of CPU at the first evaluation under load: done first, so that a spare
    # (slipstream.monitor.process.proxy.Spare) has it done before it is needed, while it waits for its settings.
    load_statistics()
    try:
        conn.send(("idle",))  # warm: a spare that says so is taken over; one still importing is not
        settings_json, run = conn.recv()
    except (EOFError, OSError):  # a spare the server never needed: it went away first
        return
    try:
        settings = MonitorSettings.model_validate_json(settings_json)
        # Serving first: this process catches up when a core is free. Linux keeps a niceness and a CPU
        # affinity per thread and a thread inherits its creator's, so both come before any thread starts (the
        # log's writer, the webhook's sender); before, the log's writer thread ran at the server's priority.
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), niceness(settings)))
        pin_thread(cpus)
        worker = Worker(conn, settings, run)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    # Every batch allocates thousands of small acyclic objects; at the default thresholds the collector
    # walked the monitor's long-lived state often enough to add ~14 µs per request in spikes (measured).
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    root = logging.getLogger()
    root.handlers[:] = [_ToServer(worker)]
    root.setLevel(logging.INFO)
    worker.send(("ready",))
    worker.run()
    conn.close()


if __name__ == "__main__":  # started by slipstream.monitor.process.proxy.MonitorProcess: argv[1] is its socket's fd,
    # argv[2] (optional) the CPUs it runs on, comma-separated
    cpus = parse_cpu_list(sys.argv[2]) if sys.argv[2:] else None
    run_worker(Connection(int(sys.argv[1])), cpus)
