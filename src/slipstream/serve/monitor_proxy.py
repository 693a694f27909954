"""The server's end of monitoring: the monitor process, and one :class:`RemoteMonitor` per served version.

What stays in the server is what must answer before a reply: ``observe`` (a reference to the request's
arrays appended to a bounded deque), the optional out-of-distribution screen (it may refuse the request),
the security counters (deltas), and feedback validation (a bad batch is refused whole, with a 400). Every
50 ms the event loop turns what was observed into :class:`slipstream.monitor.ingest.Columns` (one
concatenation per tensor) and hands it to a sender thread, which pickles it into the pipe; the monitor
process (:mod:`slipstream.serve.monitor_worker`) does the rest. A reader thread takes its replies, its
periodic snapshots and its log records.

Nothing is lost silently: a full deque, a sender backlog past ``max_backlog`` batches (the process is stuck)
or a process that died drops the requests and counts them (``ingest_dropped``, an alert rule); the death is
logged, ``slipstream_monitor_process_up`` drops to 0, and serving goes on.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
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
from typing import Any

from slipstream.errors import ServerBusyError, ServingError
from slipstream.monitor import MonitorConfig, MonitorSnapshot, OODScorer, Profile, SecurityCounters
from slipstream.monitor.ingest import Pending, columns
from slipstream.monitor.service import RequestPath, check_feedback
from slipstream.serve.monitor_worker import Key
from slipstream.serve.placement import cpu_list
from slipstream.serve.settings import MonitorSettings

log = logging.getLogger("slipstream.serve")

_STOP = ("stop",)


class MonitorProcess:
    """Starts the monitor process and talks to it: sends in order from one thread, reads on another."""

    def __init__(
        self,
        settings: MonitorSettings,
        *,
        cpus: frozenset[int] | None = None,
        start_timeout_s: float = 120.0,
        max_backlog: int = 200,
    ) -> None:
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
        self.process = subprocess.Popen(
            [sys.executable, "-m", "slipstream.serve.monitor_worker", str(theirs.fileno()), *_cpu_arg(cpus)],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._conn = Connection(mine.detach())
        self._conn.send(settings.model_dump_json())
        self.max_backlog = max_backlog
        self.on_snapshot: Callable[[Key, str], None] = lambda key, doc: None
        self.exit_reason: str | None = None
        self._closing = False
        self._outbox: queue.SimpleQueue[tuple[int | None, tuple[Any, ...]]] = queue.SimpleQueue()
        self._backlog = 0  # batches queued and not yet written to the pipe
        self.lost = 0  # requests observed and never delivered because the process had stopped
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
            self._fail(f"it did not start within {start_timeout_s:g} s")
            raise ServingError(
                f"The monitor process did not start within {start_timeout_s:g} s.",
                hint="Check the server's log; start without --monitor-db to serve unmonitored.",
            ) from None

    @property
    def alive(self) -> bool:
        return self.exit_reason is None

    # -- sending (any thread) ---------------------------------------------------------------------
    def send(self, message: tuple[Any, ...], *, requests: int | None = None) -> bool:
        """Queue a message; False when the process is gone, or too far behind to take a batch of
        ``requests`` (a batch of served requests is the only message that is ever refused for that)."""
        with self._lock:
            if not self.alive or (requests is not None and self._backlog >= self.max_backlog):
                return False
            self._backlog += requests is not None
        self._outbox.put((requests, message))
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

    def count_lost(self, requests: int) -> None:
        with self._lock:
            self.lost += requests

    def unavailable(self) -> ServerBusyError:
        return ServerBusyError(
            f"The monitor process is not running ({self.exit_reason}); the server keeps serving unmonitored.",
            hint="See the server's log for why it stopped; restart the server to monitor again.",
        )

    def _send_loop(self) -> None:
        while True:
            requests, message = self._outbox.get()
            if message is _STOP:
                return
            sent = False
            try:
                if self.alive:
                    self._conn.send(message)
                    sent = True
            except (OSError, ValueError) as exc:  # the pipe broke: the process died
                self._fail(f"the pipe to it broke: {exc}")
            if requests is not None:
                with self._lock:
                    self._backlog -= 1
                    self.lost += 0 if sent else requests

    # -- receiving (the reader thread) ------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._fail(f"it exited with code {_wait(self.process, 5)}")
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
        elif kind == "snapshot":
            self.on_snapshot(message[1], message[2])
        elif kind == "log":
            _, name, level, text = message
            logging.getLogger(name).log(level, "%s", text, extra={"event": "monitor_process"})
        elif kind == "ready":
            self._ready.set_result(None)
        elif kind == "failed":
            self._ready.set_exception(ServingError(f"The monitor process could not start: {message[1]}."))

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.exit_reason is not None:
                return
            self.exit_reason = reason
            waiting = list(self._replies.values())
        if not self._closing:
            log.error("the monitor process stopped (%s); serving goes on, unmonitored", reason,
                      extra={"event": "monitor_process_down"})  # fmt: skip
        for reply in waiting:
            if not reply.done():
                reply.set_exception(self.unavailable())
        if not self._ready.done():
            self._ready.set_exception(ServingError(f"The monitor process stopped: {reason}."))

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
        if _wait(self.process, timeout_s) is None:
            log.error("the monitor process did not exit; terminating it")
            self.process.terminate()
            _wait(self.process, 5)
        self._reader.join(5)
        self._conn.close()
        return counts


class RemoteMonitor(RequestPath):
    """What the server holds per monitored version; the work happens in the monitor process."""

    def __init__(
        self, process: MonitorProcess, model: str, version: str, profile: Profile | None, config: MonitorConfig
    ) -> None:
        self.process = process
        self.model, self.version = model, version
        self.key: Key = (model, version)
        self.profile = profile
        self.config = config
        self.scorer = OODScorer(profile) if profile is not None and profile.multivariate is not None else None
        self.counters = SecurityCounters()  # deltas, shipped with each batch
        self.latest: MonitorSnapshot | None = None
        self._pending: deque[Pending] = deque()
        self._dropped = self.screen_errors = 0
        self._ship_lock = threading.Lock()  # one batch at a time, in order, whoever ships

    # -- per request (event loop): screen() and observe() come from RequestPath ----------------------
    def _submit(self, item: Pending) -> bool:
        if len(self._pending) >= self.config.max_pending_requests:
            self._dropped += 1
            return False
        self._pending.append(item)
        return True

    def _lost(self) -> None:
        self._dropped += 1

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
            if self.process.send(("batch", self.key, batches, counts), requests=len(items)):
                return len(items)
            if self.process.alive:  # behind: counted as dropped, shipped with the next batch it takes
                self._dropped += len(items) + dropped
                self.screen_errors += screen_errors
                self.counters.add(security)
            else:
                self.process.count_lost(len(items))
            return 0

    def evaluate(self) -> MonitorSnapshot:
        """Evaluate now, in the monitor process, after everything observed so far (blocking: worker threads)."""
        self.ship()
        return self.set_latest(self.process.call("evaluate", self.key))

    def set_latest(self, doc: str) -> MonitorSnapshot:
        self.latest = snap = MonitorSnapshot.model_validate_json(doc)
        return snap


def _cpu_arg(cpus: frozenset[int] | None) -> list[str]:
    return [cpu_list(cpus)] if cpus else []


def _wait(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit code, or None when it still runs after ``timeout_s``."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None
