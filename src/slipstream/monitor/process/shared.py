"""One monitor process for several servers: ``slipstream serve --workers N``.

The parent of the workers runs the one monitor process (a :class:`slipstream.monitor.process.supervisor.
Supervisor` with ``listen``: it restarts the process when it dies, and the process listens on a Unix socket).
Each worker reaches it through a :class:`SharedMonitor`, which offers the worker's monitors what a
Supervisor offers a lone server, over a :class:`MonitorLink` (a connection to that socket) instead of a
pipe to a child of its own. When the process dies the link breaks; the SharedMonitor settles the link's
books, waits the same backoff, connects to the restarted process and attaches its versions again.

Exact accounting across workers: each link has its own name, so the process counts that link's rows apart
(written per (run, link) in the log itself, under
:func:`slipstream.monitor.process.accounting.run_key`); each worker settles only its own rows, and the
totals over the workers sum exactly: observed = written + dropped + lost (+ pending while in flight).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from slipstream.errors import ServingError
from slipstream.monitor.process.accounting import run_key
from slipstream.monitor.process.proxy import MonitorProcess, Spare
from slipstream.monitor.process.supervisor import Supervisor
from slipstream.monitor.process.worker import Key
from slipstream.serve.settings import MonitorServing


class Peer:
    """The shared monitor process as a link sees it: a pid to report (from its ``ready``), not a child to wait
    for or kill (its parent, the workers' parent, does that)."""

    def __init__(self) -> None:
        self.pid = 0


class MonitorLink(MonitorProcess):
    """One connection of one worker to the shared monitor process; ``run`` becomes ``run/name`` once the
    process says which run it is (the key of this link's written count in the log)."""

    def __init__(
        self,
        settings: MonitorServing,
        *,
        address: str,
        name: str,
        start_timeout_s: float = 120.0,
        on_exit: Callable[[MonitorProcess], None] = lambda process: None,
    ) -> None:
        self.name = name
        self.start_timeout_s = start_timeout_s
        super().__init__(settings, start_timeout_s=start_timeout_s, on_exit=on_exit, listen=address)

    def _open(
        self, settings: MonitorServing, cpus: frozenset[int] | None, spare: Spare | None, listen: str | None
    ) -> tuple[Any, Connection]:
        if listen is None:
            raise ValueError("a MonitorLink needs the shared monitor process's address")
        deadline = time.monotonic() + self.start_timeout_s
        while True:  # the parent may be restarting it: its socket comes back at the same path
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(listen)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ServingError(
                        f"Could not connect to the shared monitor process at '{listen}' within "
                        f"{self.start_timeout_s:g} s: {exc}.",
                        hint="The workers' parent runs it; see its log for why it is not up.",
                    ) from exc
                time.sleep(0.1)
        conn = Connection(sock.detach())
        conn.send(("hello", self.name))
        return Peer(), conn

    def _on_ready(self, message: tuple[Any, ...]) -> None:
        _, run, pid = message
        self.run = run_key(str(run), self.name)
        self.process.pid = int(pid)
        self._ready.set_result(None)

    def _ended(self) -> str:
        return f"the shared monitor process (pid {self.process.pid}) closed the connection"

    def _broken(self, exc: Exception) -> str:
        return f"the connection to the shared monitor process broke: {exc}"

    def _reap(self, timeout_s: float) -> None:
        return None  # not this worker's child

    def _kill(self) -> int | None:
        with contextlib.suppress(OSError):
            self._conn.close()  # only the link: the process goes on serving the other workers
        return None


class SharedMonitor(Supervisor):
    """A worker's view of the monitor process its parent runs for every worker: what a Supervisor offers,
    over a :class:`MonitorLink` that is made again (with the Supervisor's backoff) when the process restarts."""

    def __init__(
        self,
        settings: MonitorServing,
        *,
        address: str,
        worker: str,
        on_snapshot: Callable[[Key, str], None] = lambda key, doc: None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.address = address
        self.worker = worker
        self._links = itertools.count(1)
        super().__init__(settings, on_snapshot=on_snapshot, start_timeout_s=start_timeout_s)

    def _start(self) -> MonitorProcess:
        # A new name per link: a link's books start at zero, so its key in the log must be new too.
        link = MonitorLink(
            self.settings,
            address=self.address,
            name=f"{self.worker}.{os.getpid()}.{next(self._links)}",
            start_timeout_s=self.start_timeout_s,
            on_exit=self._on_exit,
        )
        link.on_snapshot = self.on_snapshot
        return link

    def _prepare_spare(self) -> None:
        return None  # the parent keeps the spare

    @property
    def standby(self) -> str:
        return "shared"
