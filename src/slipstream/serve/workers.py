"""``slipstream serve --workers N``: N serving processes on one port, one monitor process, one parent.

One event loop holds the GIL for the HTTP work, which caps a small model at one core's worth of Python; N
processes use N. This module is both ends:

- **The parent** (:func:`serve_workers`) serves nothing. It starts the one monitor process (when monitoring
  is on: a Supervisor that restarts it, listening on ``monitor.sock`` for the workers), then the workers,
  each a fresh interpreter (``python -m slipstream.serve.workers``, never a fork of a process with
  onnxruntime threads). It restarts a worker that dies, after a backoff (0.5 s doubling to 30 s; one that
  served 30 s starts it over), and logs why it died. On SIGTERM or SIGINT it sends every worker SIGTERM (each
  drains as a lone server does: serve.server.DrainingServer), waits for them, then closes the monitor
  process, which writes everything the workers sent. A worker that fails before any worker ever served
  (no model loads, the port is taken) stops them all: exit 1, as a lone server would.
- **A worker** (:func:`run_worker`) binds the port itself with SO_REUSEPORT, so the kernel spreads
  connections across the workers by their addresses; a worker that dies takes only the connections it
  held. Its onnxruntime threads are its share of the cores (``max(1, cores // N)``) unless ``--threads``
  was given. It reaches the shared monitor process through
  :class:`slipstream.monitor.process.shared.SharedMonitor`, and its siblings through
  :class:`slipstream.serve.fleet.Fleet` (/metrics summed over the workers, repository changes applied by
  all). Its access-log lines and server log lines carry ``"worker": pid``.

The default, ``--workers 1``, never comes here: one process, no parent, exactly as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, cast

import orjson

from slipstream.serve.settings import ServeSettings

log = logging.getLogger("slipstream.serve")

RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0


def worker_settings(settings: ServeSettings, workers: int, cores: int) -> ServeSettings:
    """A worker's settings: its share of the cores for onnxruntime unless threads were set; the monitor
    unplaced (N event loops cannot each have all CPUs but one)."""
    update: dict[str, Any] = {}
    if "intra_op_threads" not in settings.model_fields_set:
        update["intra_op_threads"] = max(1, cores // workers)
    if settings.monitor.enabled:
        update["monitor"] = settings.monitor.model_copy(update={"placement": "none"})
    return settings.model_copy(update=update)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT (every worker binds its own; the kernel balances between them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


# -- the parent -------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker's place: its current process and its restart state."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    status: int | None = None  # the read end of the pipe it says "started" on
    started_at: float = 0.0
    ready: bool = False
    in_a_row: int = 0
    restart_at: float | None = None


class _Parent:
    def __init__(self, path: Path, settings: ServeSettings, workers: int) -> None:
        self.path = path
        self.settings = settings
        self.workers = workers
        self.rundir = Path(tempfile.mkdtemp(prefix="slipstream-workers-"))
        self.monitor: Any = None
        self.slots = [_Slot(i) for i in range(workers)]
        self.stopping = False
        self.ever_ready = False
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.worker_settings = worker_settings(settings, workers, cores)
        self.reserved: socket.socket | None = None
        port = settings.port
        if port == 0:  # one port for all: chosen here, held (bound, never listening) while the workers serve
            self.reserved = reuse_port_socket(settings.host, 0)
            port = self.reserved.getsockname()[1]
            self.worker_settings = self.worker_settings.model_copy(update={"port": port})
        self.port = port

    def start_monitor(self) -> None:
        if not self.settings.monitor.enabled:
            return
        from slipstream.monitor.process.supervisor import Supervisor
        from slipstream.monitor.store import prepare_store

        if self.settings.monitor.store is not None:
            prepare_store(self.settings.monitor.store)  # an unwritable log fails here, before any worker
        self.monitor = Supervisor(self.worker_settings.monitor, listen=str(self.rundir / "monitor.sock"))
        log.info("monitor process %d started for %d workers, logging to %s", self.monitor.process.pid,
                 self.workers, self.settings.monitor.log_location)  # fmt: skip

    def spawn(self, slot: _Slot) -> None:
        read, write = os.pipe()
        spec = {
            "path": str(self.path),
            "settings": self.worker_settings.model_dump(mode="json", exclude_unset=True),
            "index": slot.index,
            "rundir": str(self.rundir),
            "monitor": str(self.rundir / "monitor.sock") if self.monitor is not None else None,
            "status_fd": write,
            "parent": os.getpid(),
        }
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "slipstream.serve.workers"], stdin=subprocess.PIPE, pass_fds=(write,), env=env
        )
        os.close(write)
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.write(orjson.dumps(spec))
                process.stdin.close()
        slot.process, slot.status, slot.started_at, slot.ready = process, read, time.monotonic(), False
        slot.restart_at = None

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.stopping and sig == signal.SIGINT:  # a second Ctrl-C: the workers stop without waiting
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is None:
                    slot.process.send_signal(signal.SIGINT)
        self.stopping = True

    def run(self) -> int:
        for slot in self.slots:
            self.spawn(slot)
        while not self.stopping:
            self._watch_status(0.2)
            now = time.monotonic()
            for slot in self.slots:
                code = slot.process.poll() if slot.process is not None else None
                if slot.process is not None and code is not None and not self.stopping:
                    if not self.ever_ready:
                        log.error("worker %d (pid %d) stopped before any worker served (%s): stopping",
                                  slot.index, slot.process.pid, _exit_text(code))  # fmt: skip
                        self.stopping = True
                        return self._stop(1)
                    served_s = now - slot.started_at
                    slot.in_a_row = 1 if served_s >= RESTART_MAX_S else slot.in_a_row + 1
                    wait_s = min(RESTART_MAX_S, RESTART_INITIAL_S * 2 ** min(slot.in_a_row - 1, 16))
                    log.error("worker %d (pid %d) died after %.1f s: %s; restarting it in %.1f s", slot.index,
                              slot.process.pid, served_s, _exit_text(code), wait_s,
                              extra={"event": "worker_down"})  # fmt: skip
                    self._close_status(slot)
                    slot.process, slot.restart_at = None, now + wait_s
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self.spawn(slot)
        return self._stop(0)

    def _watch_status(self, timeout_s: float) -> None:
        fds = {slot.status: slot for slot in self.slots if slot.status is not None}
        if not fds:
            time.sleep(timeout_s)
            return
        try:
            readable, _, _ = select.select(list(fds), [], [], timeout_s)
        except InterruptedError:
            return
        for fd in readable:
            slot = fds[fd]
            data = b""
            with contextlib.suppress(OSError):
                data = os.read(fd, 16)
            if data and not slot.ready:
                slot.ready = True
                if not self.ever_ready:
                    self.ever_ready = True
                log.info("worker %d (pid %d) serving", slot.index, slot.process.pid if slot.process else 0,
                         extra={"event": "worker_up"})  # fmt: skip
                if all(s.ready for s in self.slots):
                    log.info("serving on http://%s:%d with %d workers", self.settings.host, self.port, self.workers)
            if not data:  # the worker closed it (it exited): poll() says how
                self._close_status(slot)

    def _close_status(self, slot: _Slot) -> None:
        if slot.status is not None:
            with contextlib.suppress(OSError):
                os.close(slot.status)
            slot.status = None

    def _stop(self, code: int) -> int:
        live = [s.process for s in self.slots if s.process is not None and s.process.poll() is None]
        log.info("stopping: draining %d worker(s)", len(live))
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + 15.0
        for process in live:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not drain in time; killing it", process.pid)
                process.kill()
                process.wait(5)
        if self.monitor is not None:  # after the workers: all they sent is written, then it exits
            self.monitor.close()
        if self.reserved is not None:
            self.reserved.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        return code


def serve_workers(path: Path, settings: ServeSettings, workers: int) -> int:
    """Run ``workers`` serving processes and supervise them until SIGTERM/SIGINT; the exit code."""
    from slipstream.serve.server import configure_logging

    configure_logging()
    parent = _Parent(path, settings, workers)
    previous = {sig: signal.signal(sig, parent.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        parent.start_monitor()
        return parent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# -- a worker ---------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker (it drains) when the parent dies, rather than serve on unsupervised."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(spec: dict[str, Any]) -> int:
    """Serve as worker ``spec['index']`` until SIGTERM (see the module docstring); the exit code."""
    from slipstream.serve.fleet import Fleet, FleetApp, WorkerSink
    from slipstream.serve.server import build_server, configure_logging

    _die_with_parent(int(spec["parent"]))
    pid = os.getpid()
    configure_logging(worker=pid)
    settings = ServeSettings.model_validate(spec["settings"])
    rundir, index = Path(spec["rundir"]), int(spec["index"])
    fleet: Fleet | None = None

    def wrap(app: Any) -> Any:
        nonlocal fleet
        if app.monitors is not None and spec["monitor"] is not None:
            app.monitors.shared = (spec["monitor"], f"w{index}")
        fleet = Fleet(app, rundir, index)
        app.metrics.aggregate = fleet.aggregate
        return FleetApp(app, fleet)

    server = build_server(
        Path(spec["path"]), settings, access_sink=cast(BinaryIO, WorkerSink(sys.stderr.buffer, pid)), wrap=wrap
    )
    status_fd = int(spec["status_fd"])

    def started() -> None:
        import asyncio

        if fleet is not None:
            fleet.loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            os.write(status_fd, b"1")

    server.on_started = started
    try:
        sock = reuse_port_socket(settings.host, settings.port)
    except OSError as exc:  # e.g. taken by a server that did not set SO_REUSEPORT
        log.error("worker %d cannot bind %s:%d: %s; stop what holds the port, or serve on another one (--port)",
                  index, settings.host, settings.port, exc)  # fmt: skip
        return 1
    try:
        server.run(sockets=[sock])
    finally:
        if fleet is not None:
            fleet.close()
        with contextlib.suppress(OSError):
            os.close(status_fd)
    return 0 if server.started else 1


if __name__ == "__main__":  # started by the parent, which writes the worker's spec (JSON) on stdin
    sys.exit(run_worker(orjson.loads(sys.stdin.buffer.read())))
