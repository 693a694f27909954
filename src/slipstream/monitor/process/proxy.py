"""The server's end of monitoring: one run of the monitor process, and one :class:`RemoteMonitor` per version.

What stays in the server is what must answer before a reply: ``observe`` (a reference to the request's
arrays appended to a bounded deque), the optional out-of-distribution screen (it may refuse the request),
the security counters (deltas), and feedback validation (a bad batch is refused whole, with a 400). Every
50 ms the event loop turns what was observed into :class:`slipstream.monitor.ingest.Columns` (one
concatenation per tensor) and hands it to a sender thread, which pickles it into the pipe; the monitor
process (:mod:`slipstream.monitor.process.worker`) does the rest. A reader thread takes its replies, its
periodic snapshots and its log records.

Nothing is lost silently: a full deque, a sender backlog past ``max_backlog`` batches (the process is stuck)
or a process that died drops the requests and counts them (``ingest_dropped``, an alert rule), and every
row is counted exactly once as written, dropped or lost (:mod:`slipstream.monitor.process.accounting`). A
:class:`MonitorProcess` is one run of the process; :class:`slipstream.monitor.process.supervisor.Supervisor`
notices its death (its socket closes: at once), logs it, restarts it with backoff, and serving goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipstream.errors import ServerBusyError, ServingError
from slipstream.monitor import MonitorConfig, MonitorSnapshot, OODScorer, Profile, SecurityCounters
from slipstream.monitor.ingest import PendingRow, columns
from slipstream.monitor.process.accounting import rows_of
from slipstream.monitor.process.placement import cpu_list
from slipstream.monitor.process.worker import Key
from slipstream.monitor.request_path import RequestPath, check_feedback
from slipstream.serve.settings import MonitorServing

if TYPE_CHECKING:
    from slipstream.monitor.process.supervisor import Supervisor

log = logging.getLogger("slipstream.serve")

_STOP = ("stop",)


class Spare:
    """A monitor process started and waiting for its settings: imports done (numpy, scipy, the monitor: about
    2 s of CPU), so that a restart under load takes seconds less. It waits using no CPU."""

    def __init__(self, cpus: frozenset[int] | None = None) -> None:
        # A fresh interpreter (never a fork of a process running onnxruntime threads, and unlike
        # multiprocessing's spawn, no re-import of the caller's __main__), on one end of a socket pair.
        mine, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
            # Its numpy work is small matrices, one batch at a time: BLAS threads would only spin.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        where = [cpu_list(cpus)] if cpus else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "slipstream.monitor.process.worker", str(theirs.fileno()), *where],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
            # Its own session: a signal to the server's process group (Ctrl-C, `timeout`, a parent's group
            # kill) must not stop it before the server has drained and shipped what it observed; it exits
            # when the server closes it or goes away.
            start_new_session=True,
        )
        theirs.close()
        self.conn = Connection(mine.detach())
        self._warm = False
        self._lock = threading.Lock()  # the status endpoint and the supervisor both ask

    def warm(self) -> bool:
        """Whether it runs and has finished importing (else a fresh start is as quick, and surely alive)."""
        if self.process.poll() is not None:
            return False
        with self._lock:
            try:
                while not self._warm and self.conn.poll(0):
                    self._warm = self.conn.recv() == ("idle",)
            except (EOFError, OSError):
                return False
            return self._warm

    def discard(self) -> None:
        self.conn.close()
        if self.process.poll() is None:
            self.process.kill()
        _wait(self.process, 5)


class MonitorProcess:
    """Starts one run of the monitor process and talks to it: sends in order from one thread, reads on another.

    ``sent_rows`` counts the rows of every batch this run took; ``acked`` is what it said it settled
    (rows written, rows dropped by reason). ``on_exit`` is called once, from the thread that noticed, when
    the run stops other than by :meth:`close`."""

    def __init__(
        self,
        settings: MonitorServing,
        *,
        run: str = "",
        cpus: frozenset[int] | None = None,
        start_timeout_s: float = 120.0,
        max_backlog: int = 200,
        on_exit: Callable[[MonitorProcess], None] = lambda process: None,
        spare: Spare | None = None,
        listen: str | None = None,
    ) -> None:
        self.run = run
        self.started = time.monotonic()
        # The run's subprocess.Popen; for a link to a shared process (monitor.process.shared), its pid only.
        self.process: Any
        self.process, self._conn = self._open(settings, cpus, spare, listen)
        self.max_backlog = max_backlog
        self.on_snapshot: Callable[[Key, str], None] = lambda key, doc: None
        self.on_exit = on_exit
        self.exit_reason: str | None = None
        self._closing = False
        self._outbox: queue.SimpleQueue[tuple[int | None, tuple[Any, ...]]] = queue.SimpleQueue()
        self._backlog = 0  # batches queued and not yet written to the pipe
        self.sent_rows = 0  # rows of the batches this run took (final once exit_reason is set)
        self.acked: tuple[int, dict[str, int]] = (0, {})  # (written, dropped by reason), cumulative
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._replies: dict[int, Future[Any]] = {}
        self._ready: Future[None] = Future()
        self._sender = threading.Thread(target=self._send_loop, name="slipstream-monitor-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="slipstream-monitor-read", daemon=True)
        self._sender.start()
        self._reader.start()
        try:
            self._ready.result(start_timeout_s)
        except FutureTimeout:
            self._closing = True  # not a death to report: the caller gets the error
            self._fail(f"it did not start within {start_timeout_s:g} s")
            self.stop()
            raise ServingError(
                f"The monitor process did not start within {start_timeout_s:g} s.",
                hint="Check the server's log; start without --monitor-db to serve unmonitored.",
            ) from None
        except ServingError:
            self._closing = True
            self.stop()
            raise

    def _open(
        self, settings: MonitorServing, cpus: frozenset[int] | None, spare: Spare | None, listen: str | None
    ) -> tuple[Any, Connection]:
        """Start the run (the spare's interpreter when it is warm) and send it its settings; ``listen``: the
        Unix socket where the servers that share it connect (slipstream.monitor.process.shared)."""
        if spare is None or not spare.warm():
            if spare is not None:
                spare.discard()
            spare = Spare(cpus)
        with contextlib.suppress(OSError):  # a spare that died idle: the reader reports it
            spare.conn.send((settings.model_dump_json(), self.run, listen))
        return spare.process, spare.conn

    def _ended(self) -> str:
        """Why the run's pipe closed (its end of the socket: the process exited)."""
        return exit_text(_wait(self.process, 5))

    def _broken(self, exc: Exception) -> str:
        code = _wait(self.process, 1.0)
        return exit_text(code) if code is not None else f"the pipe to it broke: {exc}"

    def _reap(self, timeout_s: float) -> None:
        if _wait(self.process, timeout_s) is None:
            log.error("the monitor process did not exit; terminating it")
            self.process.terminate()
            _wait(self.process, 5)

    def _kill(self) -> int | None:
        code: int | None = self.process.poll()
        if code is None:
            self.process.kill()
            code = _wait(self.process, 5)
        return code

    def _on_ready(self, message: tuple[Any, ...]) -> None:
        self._ready.set_result(None)

    @property
    def alive(self) -> bool:
        return self.exit_reason is None

    # -- sending (any thread) ---------------------------------------------------------------------
    def send(self, message: tuple[Any, ...], *, rows: int | None = None) -> bool:
        """Queue a message; False when the process is gone, or too far behind to take a batch of ``rows``
        rows (a batch of served requests is the only message that is ever refused for that)."""
        with self._lock:
            if not self.alive or (rows is not None and self._backlog >= self.max_backlog):
                return False
            self._backlog += rows is not None
            self.sent_rows += rows or 0
        self._outbox.put((rows, message))
        return True

    def call(self, kind: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """Send a message that the process answers, and wait for the answer (worker threads only)."""
        token = next(self._tokens)
        reply: Future[Any] = Future()
        with self._lock:
            self._replies[token] = reply
        if not self.send((kind, token, *args)):
            self._replies.pop(token, None)
            raise self.unavailable()
        try:
            return reply.result(timeout_s)
        except FutureTimeout:
            raise ServerBusyError(
                f"The monitor process did not answer '{kind}' within {timeout_s:g} s.", retry_after_s=5.0
            ) from None
        finally:
            with self._lock:
                self._replies.pop(token, None)

    def unavailable(self) -> ServerBusyError:
        return ServerBusyError(
            f"The monitor process is not running ({self.exit_reason}); the server keeps serving, and restarts it.",
            retry_after_s=1.0,
            hint="See the server's log for why it stopped; slipstream_monitor_process_up says when it is back.",
        )

    def _send_loop(self) -> None:
        while True:
            requests, message = self._outbox.get()
            if message is _STOP:
                return
            try:
                if self.alive:  # what a dead run took and never got is counted lost by the supervisor
                    self._conn.send(message)
            except (OSError, ValueError) as exc:  # the pipe broke: the process died (say how, when it did)
                self._fail(self._broken(exc))
            if requests is not None:
                with self._lock:
                    self._backlog -= 1

    # -- receiving (the reader thread) ------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._fail(self._ended())
                return
            try:
                self._dispatch(message)
            except Exception as exc:  # a message this end does not understand: say so, keep reading
                log.exception("monitor process message %r: %s", message[:1], exc)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "reply":
            _, token, ok, payload = message
            with self._lock:
                reply = self._replies.get(token)
            if reply is not None:
                if ok:
                    reply.set_result(payload)
                else:
                    reply.set_exception(ServingError(f"The monitor process could not do it: {payload}."))
        elif kind == "ack":
            self.acked = (message[1], message[2])
        elif kind == "snapshot":
            self.on_snapshot(message[1], message[2])
        elif kind == "log":
            _, name, level, text = message
            # The text as the message (no "%s"): the server's rate limit keys on the message, and the
            # process has already rate-limited by its own format strings.
            logging.getLogger(name).log(level, text, extra={"event": "monitor_process"})
        elif kind == "idle":  # imported (a fresh start says it too; a spare said it before it was taken)
            pass
        elif kind == "ready":
            self._on_ready(message)
        elif kind == "failed":
            self._ready.set_exception(ServingError(f"The monitor process could not start: {message[1]}."))

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.exit_reason is not None:
                return
            self.exit_reason = reason
            waiting = list(self._replies.values())
        for reply in waiting:
            if not reply.done():
                reply.set_exception(self.unavailable())
        if not self._ready.done():
            self._ready.set_exception(ServingError(f"The monitor process stopped: {reason}."))
        if not self._closing:
            self.on_exit(self)

    # -- stopping ---------------------------------------------------------------------------------
    def close(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Ask the process to write everything and exit; returns the log's final counts (empty if it was gone)."""
        self._closing = True
        counts: dict[str, int] = {}
        if self.alive:
            try:
                counts = self.call("close", timeout_s=timeout_s)
            except ServingError as exc:
                log.error("the monitor process did not close cleanly: %s", exc)
        self._outbox.put((None, _STOP))
        self._sender.join(timeout_s)
        self._reap(timeout_s)
        self._reader.join(5)
        self._conn.close()
        return counts

    def stop(self) -> int | None:
        """End a run that is gone or must go (killed if it still runs), and its threads; its exit code."""
        self._outbox.put((None, _STOP))
        code = self._kill()
        if self._reader is not threading.current_thread():  # it reads what is left (the last acks), then EOF
            self._reader.join(5)
        self._conn.close()
        return code


class RemoteMonitor(RequestPath):
    """What the server holds per monitored version; the work happens in the monitor process."""

    def __init__(
        self, process: Supervisor, model: str, version: str, profile: Profile | None, config: MonitorConfig
    ) -> None:
        self.process = process
        self.model, self.version = model, version
        self.key: Key = (model, version)
        self.profile = profile
        self.config = config
        self.scorer = OODScorer(profile) if profile is not None and profile.multivariate is not None else None
        self.counters = SecurityCounters()  # deltas, shipped with each batch
        self.latest: MonitorSnapshot | None = None
        self._pending: deque[PendingRow] = deque()
        self._max_pending = config.max_pending_requests
        self._dropped = self.screen_errors = 0
        self._ship_lock = threading.Lock()  # one batch at a time, in order, whoever ships

    # -- per request (event loop): screen() and observe() come from RequestPath ----------------------
    def _submit(self, item: PendingRow) -> bool:
        # An append and nothing else: the request is counted observed when its batch ships (one locked
        # update per 50 ms instead of one per request), before the process can acknowledge any of it.
        if len(self._pending) >= self._max_pending:
            self._dropped += 1
            self.process.accounting.observe(rows_of(item), dropped="queue_full")
            return False
        self._pending.append(item)
        return True

    def _lost(self) -> None:
        self._dropped += 1
        self.process.accounting.observe(1, dropped="observe_error")

    def feedback_many(self, items: Iterable[tuple[str, float]]) -> int:
        """Validate the labels here (a bad batch is a 400, refused whole) and send them to the log."""
        checked = check_feedback(items, time.time())
        if not self.process.send(("feedback", self.key, checked)):
            raise self.process.unavailable()
        return len(checked)

    # -- shipping (the event loop's pump, and worker threads before they ask something) -------------
    def ship(self) -> int:
        """Send what was observed since the last call, with the counter deltas; returns the requests sent."""
        with self._ship_lock:
            items = [self._pending.popleft() for _ in range(len(self._pending))]
            security = self.counters.take()
            dropped, self._dropped = self._dropped, 0
            screen_errors, self.screen_errors = self.screen_errors, 0
            if not items and not dropped and not screen_errors and not any(security.values()):
                return 0
            batches, bad = columns(items)
            counts = {"security": security, "dropped": dropped, "screen_errors": screen_errors, "errors": bad}
            rows = sum(int(c.counts.sum()) for c in batches)
            acct = self.process.accounting
            # Every request taken is observed now; only when columns() refused some are the rows counted one
            # by one, to count the refused ones as dropped ("malformed").
            observed = sum(map(rows_of, items)) if bad else rows
            acct.observe(observed)
            acct.drop("malformed", observed - rows)
            if self.process.send(("batch", self.key, batches, counts), rows=rows):
                return len(items)
            if self.process.alive:  # behind: counted as dropped, shipped with the next batch it takes
                self._dropped += len(items) + dropped
                self.screen_errors += screen_errors
                self.counters.add(security)
                acct.drop("backlog", rows)
            else:
                acct.lose(rows)
            return 0

    def evaluate(self) -> MonitorSnapshot:
        """Evaluate now, in the monitor process, after everything observed so far (blocking: worker threads)."""
        self.ship()
        return self.set_latest(self.process.call("evaluate", self.key))

    def set_latest(self, doc: str) -> MonitorSnapshot:
        self.latest = snap = MonitorSnapshot.model_validate_json(doc)
        return snap


def exit_text(code: int | None) -> str:
    """How a process ended, for a person: 'it was killed by SIGKILL', 'it exited with code 1'."""
    if code is None:
        return "it stopped answering and still runs"
    if code < 0:
        try:
            return f"it was killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"it was killed by signal {-code} (exit code {code})"
    return f"it exited with code {code}"


def _wait(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit code, or None when it still runs after ``timeout_s``."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None
