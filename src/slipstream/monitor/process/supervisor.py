"""Keeping the monitor process running: restart it when it dies, and account for what died with it.

The server serves on without monitoring while the process is down; the :class:`Supervisor` notices a death
at once (the process's end of the socket closes, and the reader thread sees it), logs it with the exit code
or the signal, and restarts the process after a backoff (``MonitorServing.restart_initial_s``, doubling up
to ``restart_max_s``; a run that lasted ``restart_max_s`` starts the backoff over). The new run gets every
monitored version attached again before it takes a batch; what was observed in between is counted lost.
Readiness stays 200 (serving works) and says ``monitoring: degraded`` until the new run is up;
``slipstream_monitor_process_up`` and ``slipstream_monitor_restarts_total`` say the same in /metrics.

:class:`Accounting` keeps the totals: every observed row is, once settled, written, dropped (by reason) or
lost, exactly (see :mod:`slipstream.monitor.process.accounting` for the written count read back from the log).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from slipstream.errors import ServerBusyError, ServingError
from slipstream.monitor import Profile
from slipstream.monitor.process.accounting import written_by_run
from slipstream.monitor.process.proxy import MonitorProcess, Spare
from slipstream.monitor.process.worker import Key
from slipstream.serve.settings import MonitorServing

log = logging.getLogger("slipstream.serve")


class Accounting:
    """Observed rows and their fates, over every run of the monitor process (thread-safe).

    ``dropped`` by reason: ``queue_full`` (the server's pending buffer), ``backlog`` (the process was too far
    behind), ``malformed``/``observe_error`` (could not be taken), and what the process reports
    (``not_sampled``, ``ingest_error``, ``buffer_full``, ``disk_full``, ``db_error``, ``no_monitor``,
    ``closed``). ``lost``: observed while no process ran, or sent to one that died before settling them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.observed = 0
        self.lost = 0
        self._written = 0  # by the runs that ended
        self._dropped: dict[str, int] = {}  # here, and by the runs that ended

    def observe(self, rows: int, *, dropped: str | None = None) -> None:
        with self._lock:
            self.observed += rows
            if dropped is not None:
                self._dropped[dropped] = self._dropped.get(dropped, 0) + rows

    def drop(self, reason: str, rows: int) -> None:
        if rows:
            with self._lock:
                self._dropped[reason] = self._dropped.get(reason, 0) + rows

    def lose(self, rows: int) -> None:
        with self._lock:
            self.lost += rows

    def settle(self, sent: int, written: int, dropped: dict[str, int]) -> int:
        """Close the books of a run that ended: it took ``sent`` rows; returns the rows lost with it."""
        lost = sent - written - sum(dropped.values())
        with self._lock:
            self._written += written
            for reason, n in dropped.items():
                self._dropped[reason] = self._dropped.get(reason, 0) + n
            self.lost += lost
        return lost

    def totals(self, live: MonitorProcess | None) -> dict[str, Any]:
        """observed = written + dropped + lost + pending; ``pending``: observed, not yet settled (queued here,
        or taken by the live run and not yet acknowledged)."""
        written, run_dropped = live.acked if live is not None else (0, {})
        with self._lock:
            dropped = dict(self._dropped)
            written += self._written
            observed, lost = self.observed, self.lost
        for reason, n in run_dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        dropped = {k: v for k, v in sorted(dropped.items()) if v}
        pending = observed - written - sum(dropped.values()) - lost
        return {"observed": observed, "written": written, "dropped": dropped, "lost": lost, "pending": pending}


class Supervisor:
    """The monitor process as the server sees it: one run at a time, restarted when it dies.

    Offers what :class:`slipstream.monitor.process.proxy.RemoteMonitor` needs (``send``, ``call``, ``alive``,
    ``unavailable``, ``accounting``) whichever run is current."""

    def __init__(
        self,
        settings: MonitorServing,
        *,
        cpus: frozenset[int] | None = None,
        on_snapshot: Callable[[Key, str], None] = lambda key, doc: None,
        start_timeout_s: float = 120.0,
        listen: str | None = None,
    ) -> None:
        self.settings = settings
        self.cpus = cpus
        self.listen = listen  # where servers that share the process connect (monitor.process.shared); None: none
        self.on_snapshot = on_snapshot
        self.start_timeout_s = start_timeout_s
        self.accounting = Accounting()
        self.restarts = 0
        self.down_since: float | None = None
        self.last_outage_s: float | None = None  # from the death noticed to the new run taking batches
        self.last_exit: str | None = None
        self._lock = threading.Lock()
        self._attach_lock = threading.Lock()  # attaching a version and re-attaching all of them, one at a time
        self._attached: dict[Key, tuple[str, Profile | None]] = {}
        self._settled: set[str] = set()  # the runs whose books are closed
        self._settle_lock = threading.Lock()
        self._died = threading.Event()
        self._closing = threading.Event()
        self._spare: Spare | None = None
        self.current = self._start()  # the first start fails loudly: the caller refuses to serve it monitored
        self._prepare_spare()
        self._thread = threading.Thread(target=self._supervise, name="slipstream-monitor-supervisor", daemon=True)
        self._thread.start()

    # -- what RemoteMonitor and ServeMonitors use --------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.down_since is None and self.current.alive

    @property
    def exit_reason(self) -> str | None:
        return None if self.alive else self.last_exit or self.current.exit_reason

    @property
    def process(self) -> Any:
        """The current run's ``subprocess.Popen`` (its pid: ``process.pid``)."""
        return self.current.process

    @property
    def state(self) -> str:
        """``ok`` while a run serves, ``degraded`` while none does (readiness details)."""
        return "ok" if self.alive else "degraded"

    def send(self, message: tuple[Any, ...], *, rows: int | None = None) -> bool:
        return self.alive and self.current.send(message, rows=rows)

    def call(self, kind: str, *args: Any, timeout_s: float = 60.0) -> Any:
        if not self.alive:
            raise self.unavailable()
        return self.current.call(kind, *args, timeout_s=timeout_s)

    def unavailable(self) -> ServerBusyError:
        return self.current.unavailable() if not self.current.alive else ServerBusyError(
            "The monitor process is restarting; the server keeps serving.", retry_after_s=1.0
        )  # fmt: skip

    def attach(self, key: Key, bundle_dir: str, profile: Profile | None) -> None:
        """Monitor a version in this run and every later one (when no run is up, the next one attaches it)."""
        with self._attach_lock:
            self._attached[key] = (bundle_dir, profile)
            if self.alive:
                self.current.call("attach", key, bundle_dir, profile)

    def detach(self, key: Key) -> None:
        with self._attach_lock:
            self._attached.pop(key, None)
            if self.alive:
                self.current.call("detach", key)

    def totals(self) -> dict[str, Any]:
        with self._lock:  # a run that died and is not yet settled still counts what it acknowledged
            run = self.current
            return self.accounting.totals(None if run.run in self._settled else run)

    def wait_settled(self, timeout_s: float = 30.0) -> bool:
        """Wait until a run that died has its books closed (what it took and never settled counted lost)."""
        deadline = time.monotonic() + timeout_s
        while not self.alive and self.current.run not in self._settled:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- runs ----------------------------------------------------------------------------------------
    def _start(self) -> MonitorProcess:
        """A new run: the spare's when there is one (a second), else a fresh interpreter's (seconds)."""
        spare, self._spare = self._spare, None
        run = MonitorProcess(
            self.settings,
            run=uuid.uuid4().hex,
            cpus=self.cpus,
            start_timeout_s=self.start_timeout_s,
            on_exit=self._on_exit,
            spare=spare,
            listen=self.listen,
        )
        run.on_snapshot = self.on_snapshot
        return run

    def _prepare_spare(self) -> None:
        """Start the spare, at the server's priority: its imports cost what a fresh start's would (about 2 s of
        CPU, once per death), but before the next death instead of while monitoring is down. Niced instead
        (measured once, 2 busy CPUs, wrk -c8), a spare started seconds before a kill was still importing and
        monitoring came back after 14 s instead of 2."""
        if self.settings.standby and self._spare is None and not self._closing.is_set():
            self._spare = Spare(self.cpus)

    @property
    def standby(self) -> str:
        """The spare: ``warm`` (ready to take over), ``starting`` (still importing), ``gone`` (it died idle: the
        next restart starts afresh) or ``off``."""
        spare = self._spare
        if spare is None:
            return "off"
        return "warm" if spare.warm() else "starting" if spare.process.poll() is None else "gone"

    def _on_exit(self, run: MonitorProcess) -> None:
        with self._lock:
            if run is not self.current or self.down_since is not None:
                return
            self.down_since = time.monotonic()
            self.last_exit = run.exit_reason
        self._died.set()

    def _supervise(self) -> None:
        in_a_row = 0
        while True:
            self._died.wait()
            if self._closing.is_set():
                return
            dead = self.current
            dead.stop()
            lost = self._settle(dead)
            in_a_row = 1 if time.monotonic() - dead.started >= self.settings.restart_max_s else in_a_row + 1
            wait_s = self.settings.restart_backoff_s(in_a_row)
            log.error("the monitor process (pid %d) died: %s; %d prediction(s) in flight to it lost; serving goes "
                      "on unmonitored, restarting it in %.1f s", dead.process.pid, self.last_exit, lost, wait_s,
                      extra={"event": "monitor_process_down"})  # fmt: skip
            while not self._closing.is_set():
                if self._closing.wait(wait_s):
                    return
                try:
                    began = time.monotonic()
                    warm = self._spare is not None and self._spare.warm()
                    run = self._restart()
                except Exception as exc:  # e.g. a log it cannot open: the supervisor outlives it and retries
                    in_a_row += 1
                    wait_s = self.settings.restart_backoff_s(in_a_row)
                    self.last_exit = f"the restart failed: {type(exc).__name__}: {exc}"
                    log.error("restarting the monitor process failed (%s: %s); trying again in %.1f s",
                              type(exc).__name__, exc, wait_s, exc_info=not isinstance(exc, ServingError),
                              extra={"event": "monitor_process_down"})  # fmt: skip
                    continue
                with self._lock:
                    self.current = run
                    if not self._closing.is_set():  # else close() needs the wake-up to stop this thread
                        self._died.clear()
                    down_s = self.last_outage_s = time.monotonic() - (self.down_since or time.monotonic())
                    self.down_since = None
                    self.restarts += 1
                log.warning("monitor process restarted (pid %d, restart %d, %s in %.2f s), monitoring restored "
                            "after %.2f s down", run.process.pid, self.restarts, "the spare taken over" if warm else
                            "a fresh start", time.monotonic() - began, down_s,
                            extra={"event": "monitor_process_up"})  # fmt: skip
                if not run.alive:  # it died again while taking over: go round once more
                    self._on_exit(run)
                self._prepare_spare()
                break

    def _restart(self) -> MonitorProcess:
        run = self._start()
        try:
            with self._attach_lock:
                for key, (bundle_dir, profile) in self._attached.items():
                    run.call("attach", key, bundle_dir, profile)
        except ServingError:
            run.stop()
            raise
        return run

    def _settle(self, run: MonitorProcess) -> int:
        """Close the books of a run that ended: written from the log itself, dropped as acknowledged."""
        with self._settle_lock:
            if run.run in self._settled:
                return 0
            acked_written, dropped = run.acked
            written = written_by_run(self.settings.store, run.run) if self.settings.store is not None else None
            if written is None:  # unreadable log: the acknowledged count (rows written after it count as lost)
                written = acked_written
            with self._lock:  # the books and the set of settled runs change together (see totals)
                lost = self.accounting.settle(run.sent_rows, written, dropped)
                self._settled.add(run.run)
        if lost < 0:  # a bug in the accounting, never a reason to stop serving: say so loudly
            log.error("monitor accounting: run %s settled %d more row(s) than it was sent", run.run, -lost)
        return lost

    def close(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Stop supervising, close the current run cleanly, and settle its books."""
        self._closing.set()
        self._died.set()
        self._thread.join(timeout_s)
        if self._spare is not None:
            self._spare.discard()
            self._spare = None
        run = self.current
        counts = run.close(timeout_s) if run.alive else {}
        run.stop()
        self._settle(run)  # a no-op when the supervisor did it
        self.down_since = self.down_since or time.monotonic()
        return counts
