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

Before all that, the server that started it sends ``(settings JSON, run id, listen)``. With ``listen`` (a Unix
socket's path: ``slipstream serve --workers N``, whose parent starts this process) other servers connect there,
each saying ``("hello", name)`` first and answered ``("ready", run id, pid)``; each then speaks the protocol
above on its own connection, with its own books (rows written per (run, name) in the log: see
:mod:`slipstream.monitor.process.accounting`), and its ``close`` ends only its connection. A version monitored
by several servers has one monitor (one drift window over all their traffic) and its snapshots go to each.

Every row of every batch ends in exactly one
count of the acknowledgement: written, or dropped for a reason (``not_sampled``, ``ingest_error``,
``buffer_full``, ``disk_full``, ``db_error``, ``no_monitor``, ``closed``); see
:mod:`slipstream.monitor.process.accounting` for how the server turns them into exact totals.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from slipstream.logs import RateLimitFilter
from slipstream.monitor import Monitor, Profile
from slipstream.monitor.drift import load_statistics
from slipstream.monitor.fleet import coordinator
from slipstream.monitor.ingest import Columns
from slipstream.monitor.process.accounting import accounted_store
from slipstream.monitor.process.placement import parse_cpu_list, pin_thread
from slipstream.serve.settings import MonitorServing

log = logging.getLogger("slipstream.monitor")

Key = tuple[str, str]

DROP_REASONS = ("not_sampled", "ingest_error", "buffer_full", "no_monitor", "closed")


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


class Client:
    """One server this process serves: its pipe, its own books (rows it dropped by reason; what the log
    wrote of its rows is counted per client in the store) and the versions it monitors."""

    def __init__(self, conn: Connection, name: str | None) -> None:
        self.conn = conn
        self.name = name  # None until it said hello (a server that connected to the listening socket)
        self.lock = threading.Lock()  # the webhook thread logs too: one message at a time on the pipe
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.acked: tuple[int, dict[str, int]] | None = None
        self.keys: set[Key] = set()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)


class Worker:
    """Serves the server that started it (``main``) and, with ``listen``, every server that connects to that
    Unix socket (``slipstream serve --workers N``: one per worker); see the module docstring."""

    def __init__(self, conn: Connection, settings: MonitorServing, run: str = "", listen: str | None = None) -> None:
        store = settings.required_store("The monitor process")
        self.conn = conn
        self.settings = settings
        self.config = settings.config  # the server's own config object, as it sent it: no translation
        self.run_id = run
        self.main = Client(conn, "")
        self.clients: dict[Connection, Client] = {conn: self.main}
        self.listen = listen
        self.listener = _listen(listen) if listen is not None else None
        cap = None if settings.log_max_mb is None else int(settings.log_max_mb * 1e6)
        self.store = accounted_store(store, run=run, max_bytes=cap)
        # A fleet on PostgreSQL: one evaluator per version, its alert state and snapshots shared
        # (slipstream.monitor.fleet). SQLite (one machine): None, and evaluation stays as it was.
        self.fleet = coordinator(store)
        self.monitors: dict[Key, Monitor] = {}
        self._due: dict[Key, float] = {}
        self.holders: dict[Key, set[Client]] = {}  # which servers monitor each version

    @property
    def dropped(self) -> dict[str, int]:
        """The rows of the server that started this process dropped here, by reason."""
        return self.main.dropped

    def send(self, message: tuple[Any, ...]) -> None:
        """To the server that started this process (log records go there only)."""
        self.main.send(message)

    def run(self) -> None:
        """Serve messages until the server that started it says close (or goes away), evaluating on schedule.

        One message per ready pipe per round, so no server can starve another."""
        while True:
            now = time.monotonic()
            wait = max(0.0, min(self._due.values(), default=now + 1.0) - now)
            if self.store.settled()[2]:  # rows on their way to the log: acknowledge them soon after
                wait = min(wait, 0.05)
            sources: list[Any] = [*self.clients]
            if self.listener is not None:
                sources.append(self.listener)
            for ready in wait_for(sources, wait):
                if ready is self.listener:
                    self._accept()
                    continue
                client = self.clients[ready]  # type: ignore[index]  # wait() returns what it was given
                try:
                    message = client.conn.recv()
                except (EOFError, OSError):
                    if client is self.main:  # the server died: write what was shipped, then stop
                        log.error("the server went away; the monitor process writes what it has and exits")
                        self._close()
                        return
                    self._leave(client)
                    continue
                try:
                    if self.handle(message, client) and client is self.main:
                        return
                except Exception as exc:  # one bad message must not stop monitoring; logged with its traceback
                    log.exception("monitor process: %s failed: %s", message[0], exc)
            self._evaluate_due()
            self.ack()

    def accounting(self, client: Client | None = None) -> tuple[int, dict[str, int]]:
        """One server's rows written and rows dropped by reason, so far (see the module docstring)."""
        client = client or self.main
        written, failed, _ = self.store.settled(client.name or "")
        return written, {**client.dropped, **failed}

    def ack(self) -> None:
        """Tell each server what was settled of its rows since its last acknowledgement (nothing when nothing)."""
        for client in list(self.clients.values()):
            if client.name is None:
                continue
            now = self.accounting(client)
            if now != client.acked:
                with contextlib.suppress(OSError, ValueError):  # one gone: its pipe's end says so next round
                    client.send(("ack", *now))
                client.acked = now

    def handle(self, message: tuple[Any, ...], client: Client | None = None) -> bool:
        """Act on one message from ``client`` (the main server by default); True when it was ``close``."""
        client = client or self.main
        kind = message[0]
        if kind == "batch":
            _, key, batches, counts = message
            self._ingest(key, batches, counts, client)
        elif kind == "feedback":
            self.store.put_feedback(message[2])
        elif kind == "hello" and client.name is None:  # a server sharing this process: its name, once
            client.name = str(message[1])
            client.send(("ready", self.run_id, os.getpid()))
            log.info("monitor process: server %s connected (%d served)", client.name, len(self.clients) - 1)
        elif kind in ("attach", "detach", "evaluate", "flush", "close"):
            token = message[1]
            try:
                if kind == "close" and client is not self.main:
                    payload: Any = self._bye(client)
                elif kind in ("attach", "detach", "flush"):
                    payload = getattr(self, f"_{kind}")(*message[2:], client=client)
                else:
                    payload = getattr(self, f"_{kind}")(*message[2:])
            except Exception as exc:
                log.exception("monitor process: %s failed: %s", kind, exc)
                client.send(("reply", token, False, f"{type(exc).__name__}: {exc}"))
            else:
                client.send(("reply", token, True, payload))
                if kind == "close" and client is not self.main:
                    self._leave(client)
            return bool(kind == "close")
        else:
            log.error("monitor process: unknown message %r ignored", kind)
        return False

    def _accept(self) -> None:
        if self.listener is None:
            return
        try:
            sock, _ = self.listener.accept()
        except OSError as exc:
            log.warning("monitor process: a server could not connect: %s", exc)
            return
        conn = Connection(sock.detach())
        self.clients[conn] = Client(conn, None)

    def _leave(self, client: Client) -> None:
        """A sharing server went away: stop monitoring for it. What it sent is still written and counted under
        its own key in the log, where it (or its restart) reads it back."""
        for key in list(client.keys):
            self._detach(key, client=client)
        self.clients.pop(client.conn, None)
        with contextlib.suppress(OSError):
            client.conn.close()
        if client.name is not None:
            log.info("monitor process: server %s left", client.name)

    def _bye(self, client: Client) -> dict[str, int]:
        """A sharing server closes: write its rows, settle them, and say so before it goes."""
        self.store.flush()
        self.ack()
        written, dropped = self.accounting(client)
        return {"written_predictions": written, **{f"dropped_{k}": v for k, v in dropped.items()}}

    def _ingest(self, key: Key, batches: list[Columns], counts: dict[str, Any], client: Client | None = None) -> None:
        dropped = (client or self.main).dropped
        mon = self.monitors.get(key)
        if mon is None:
            lost = sum(c.requests for c in batches)
            dropped["no_monitor"] += sum(int(c.counts.sum()) for c in batches)
            log.error("monitor process: %d request(s) of %s version %s arrived after its monitor closed", lost, *key)
            return
        self.store.client = (client or self.main).name or ""  # whose rows the store takes next
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
                dropped["ingest_error"] += rows
                continue
            took = ing.sampled - sampled
            dropped["not_sampled"] += rows - took
            dropped["buffer_full"] += took - (self.store.counts()["accepted_predictions"] - accepted)

    def _attach(self, key: Key, bundle_dir: str, profile: Profile | None, *, client: Client | None = None) -> None:
        """The server read the profile (it screens with it) and sends it: no second read, one error path. A
        version other servers monitor already keeps its monitor (one drift window over all their traffic)."""
        client = client or self.main
        holders = self.holders.setdefault(key, set())
        if key not in self.monitors or not holders - {client}:
            self.monitors[key] = Monitor(
                model=key[0], version=key[1], profile=profile, store=self.store, config=self.config,
                bundle_dir=bundle_dir,
            )  # fmt: skip
            self._due[key] = time.monotonic() + self.config.evaluate_interval_s
            if self.fleet is not None:
                self.fleet.join(key, self.monitors[key])
        holders.add(client)
        client.keys.add(key)

    def _detach(self, key: Key, *, client: Client | None = None) -> None:
        client = client or self.main
        client.keys.discard(key)
        holders = self.holders.get(key, set())
        holders.discard(client)
        if holders:  # other servers still monitor it
            return
        self.holders.pop(key, None)
        mon = self.monitors.pop(key, None)
        self._due.pop(key, None)
        if mon is not None:
            mon.close(close_store=False)
        if self.fleet is not None:
            self.fleet.resign(key)

    def _evaluate(self, key: Key) -> str:
        """Evaluate a version now; in a fleet, only its evaluator does: the others take its latest snapshot
        (until it published one, or while the database is away, they evaluate their own traffic)."""
        mon = self.monitors.get(key)
        if mon is None:
            raise KeyError(f"no monitor for {key[0]} version {key[1]}")
        return mon.evaluate().model_dump_json() if self.fleet is None else self.fleet.evaluate(key, mon)

    def _evaluate_due(self) -> None:
        now = time.monotonic()
        for key, due in list(self._due.items()):
            if due > now:
                continue
            self._due[key] = now + self.config.evaluate_interval_s
            try:
                snapshot = ("snapshot", key, self._evaluate(key))
            except Exception as exc:  # keep monitoring; logged with its traceback
                log.exception("monitor evaluation of %s version %s failed: %s", *key, exc)
                continue
            for client in list(self.holders.get(key, ())):
                with contextlib.suppress(OSError, ValueError):  # one gone: its pipe's end says so next round
                    client.send(snapshot)

    def _flush(self, *, client: Client | None = None) -> tuple[int, dict[str, int]]:
        """Write what was taken so far, then acknowledge it (so the server's accounting is settled)."""
        self.store.flush()
        self.ack()
        return self.accounting(client)

    def _close(self) -> dict[str, int]:
        for key in list(self.monitors):
            self.holders.pop(key, None)
            mon = self.monitors.pop(key)
            self._due.pop(key, None)
            mon.close(close_store=False)
        self.store.close()
        if self.fleet is not None:
            self.fleet.close()  # the server releases the evaluator roles: another replica takes them
        for client in self.clients.values():  # raced with the close: counted, never gone
            client.dropped["closed"] += self.store.settled(client.name or "")[2]
        with contextlib.suppress(Exception):  # the servers may be gone already
            self.ack()
        if self.listener is not None and self.listen is not None:
            self.listener.close()
            Path(self.listen).unlink(missing_ok=True)
        return self.store.counts()


def _listen(path: str) -> socket.socket:
    """The Unix socket sharing servers connect to; a dead run's file at the same path is replaced."""
    Path(path).unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    Path(path).chmod(0o600)
    sock.listen(64)
    return sock


def niceness(settings: MonitorServing) -> int:
    """The monitor process's niceness: ``process_nice`` more than the server's (whose child it is)."""
    return min(19, os.getpriority(os.PRIO_PROCESS, os.getppid()) + settings.process_nice)


def run_worker(conn: Connection, cpus: frozenset[int] | None = None) -> None:
    """Serve one server until it closes: the first message is its MonitorServing as JSON and this run's id
    (see slipstream.monitor.process.accounting). ``cpus``: where to
    run (slipstream.monitor.process.placement), set with the niceness before any thread starts."""
    # Importing scipy took ~1 s of CPU at the first evaluation under load: done first, so that a spare
    # (slipstream.monitor.process.proxy.Spare) has it done before it is needed, while it waits for its settings.
    load_statistics()
    try:
        conn.send(("idle",))  # warm: a spare that says so is taken over; one still importing is not
        settings_json, run, *rest = conn.recv()  # and, for servers that share it, the socket to listen on
    except (EOFError, OSError):  # a spare the server never needed: it went away first
        return
    listen = str(rest[0]) if rest and rest[0] is not None else None
    try:
        settings = MonitorServing.model_validate_json(settings_json)
        # Serving first: this process catches up when a core is free. Linux keeps a niceness and a CPU
        # affinity per thread and a thread inherits its creator's, so both come before any thread starts (the
        # log's writer, the webhook's sender); before, the log's writer thread ran at the server's priority.
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), niceness(settings)))
        pin_thread(cpus)
        worker = Worker(conn, settings, run, listen)
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
