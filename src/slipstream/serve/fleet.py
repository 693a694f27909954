"""What one worker of ``slipstream serve --workers N`` does for, and asks of, its siblings.

Each worker listens on a Unix socket of its own in the workers' run directory (``worker-<i>.sock``), served
by a thread (:class:`Fleet`), never by the event loop: the worker answering a scrape waits on its siblings,
and two of them scraping each other at once must not each wait on a loop that is itself waiting.

- **/metrics, summed.** The worker that gets the scrape asks every sibling for its exposition and answers
  the merge (:func:`merge_expositions`): counters and histograms sum, gauges by their meaning (in-flight and
  memory sum, "up" and "ready" take the minimum, the shared monitor's snapshots the maximum).
  ``slipstream_workers`` says how many workers the answer covers. Chosen over prometheus-client's
  multiprocess mode, which needs its own metric classes (a lock and an mmap write per observation, where
  the request path here does plain integer adds) and a directory of files that outlive the workers: here
  the counters stay where they are and cost nothing until a scrape. The price: a worker that restarts
  starts its counters at zero, as any restarted server does, and one that does not answer within a second
  is left out of that answer (``slipstream_workers`` shows it).
- **Repository changes reach every worker.** :class:`FleetApp` lets a POST to
  ``/v2/repository/models/{m}/load`` or ``/unload`` through to this worker's app; when that succeeded it has
  each sibling apply the same change before it answers, so the next request finds it done whichever worker
  takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from slipstream.serve.app import SlipstreamApp

log = logging.getLogger("slipstream.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

REPOSITORY_CHANGE = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)$")

# Gauges that are not a per-worker quantity to add up.
GAUGE_MIN_SUFFIXES = ("_up", "_ready", "_start_time_seconds")
# The monitor process is one for every worker: each worker shows the same snapshots; the newest is the largest.
SHARED = frozenset(
    {
        "slipstream_monitor_value",
        "slipstream_alert_firing",
        "slipstream_monitor_log_records",
        "slipstream_monitor_security",
        "slipstream_monitor_drift_psi",
        "slipstream_monitor_restarts",
        "slipstream_model_load_seconds",
        "process_max_fds",
    }
)
GAUGE_SUM = frozenset(
    {
        "slipstream_in_flight_requests",
        "slipstream_monitor_predictions_pending",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)


def merge_expositions(texts: list[bytes]) -> bytes:
    """One Prometheus text exposition for several workers' (see the module docstring for the rules)."""
    kinds: dict[str, tuple[str, str]] = {}  # name -> (help, type), from the first text that has it
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            kinds.setdefault(family.name, (family.documentation, family.type))
            combine = _rule(family.name, family.type)
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = samples.get(key)
                how = min if sample.name.endswith("_created") else combine
                samples[key] = sample.value if old is None else how(old, sample.value)
    out: list[Metric] = []
    for name, (documentation, kind) in kinds.items():
        family = Metric(name, documentation, kind)
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(out))
    return generate_latest(registry)


def _rule(name: str, kind: str) -> Callable[[float, float], float]:
    if name in SHARED:
        return max
    if kind == "gauge":
        if name in GAUGE_SUM:
            return _add
        return min if name.endswith(GAUGE_MIN_SUFFIXES) else max
    return _add  # counters, histograms, summaries: per-worker counts


def _add(a: float, b: float) -> float:
    return a + b


class _Fixed:
    """A collector that yields families already built (the merge)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _workers_gauge(n: int) -> bytes:
    return (
        b"# HELP slipstream_workers Workers whose series this answer sums.\n"
        b"# TYPE slipstream_workers gauge\n" + f"slipstream_workers {n}\n".encode()
    )


class Fleet:
    """This worker's end: answers its siblings (a thread on ``worker-<index>.sock``) and asks them."""

    def __init__(self, app: SlipstreamApp, rundir: Path, index: int) -> None:
        self.app = app
        self.rundir = rundir
        self.index = index
        self.path = rundir / f"worker-{index}.sock"
        self.loop: asyncio.AbstractEventLoop | None = None  # set once serving: repository changes run there
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)  # a dead predecessor's
        self._sock.bind(str(self.path))
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="slipstream-fleet", daemon=True)
        self._thread.start()

    # -- answering (the fleet thread) -------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return  # closed
            conn = Connection(sock.detach())
            try:
                conn.send(self._answer(conn.recv()))
            except (EOFError, OSError) as exc:
                log.warning("worker %d: a sibling's request failed: %s", self.index, exc)
            finally:
                conn.close()

    def _answer(self, request: tuple[Any, ...]) -> Any:
        if request[0] == "metrics":
            for _ in range(5):  # the event loop may add a series while this thread reads them
                with contextlib.suppress(RuntimeError):
                    return generate_latest(self.app.metrics.registry)
            return b""
        if request[0] == "repository" and self.loop is not None:
            _, action, name = request
            repository = self.app.repository
            change = repository.load(name) if action == "load" else repository.unload(name)
            try:
                asyncio.run_coroutine_threadsafe(change, self.loop).result(600)
            except Exception as exc:  # reported to the worker that asked, which says so in its answer
                return (False, f"{type(exc).__name__}: {exc}")
            return (True, "")
        return (False, f"unknown request {request[0]!r}")

    # -- asking -----------------------------------------------------------------------------------
    def siblings(self) -> list[Path]:
        return sorted(p for p in self.rundir.glob("worker-*.sock") if p != self.path)

    def ask(self, path: Path, request: tuple[Any, ...], timeout_s: float) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
            conn = Connection(sock.detach())
        except OSError:
            sock.close()
            raise
        try:
            conn.send(request)
            if not conn.poll(timeout_s):
                raise TimeoutError(f"no answer within {timeout_s:g} s")
            return conn.recv()
        finally:
            conn.close()

    def aggregate(self, own: bytes) -> bytes:
        """This worker's exposition summed with every sibling that answers within a second."""
        texts = [own]
        for path in self.siblings():
            try:
                texts.append(self.ask(path, ("metrics",), 1.0))
            except (OSError, EOFError, TimeoutError) as exc:  # restarting, or gone: left out, and counted
                log.warning("metrics: worker socket %s did not answer (%s); left out of this scrape", path.name, exc)
        return merge_expositions(texts) + _workers_gauge(len(texts))

    def broadcast(self, action: str, name: str) -> list[str]:
        """Have every sibling apply a repository change; the ones that could not, with why."""
        failed = []
        for path in self.siblings():
            try:
                ok, why = self.ask(path, ("repository", action, name), 600.0)
            except (OSError, EOFError, TimeoutError) as exc:
                ok, why = False, str(exc)
            if not ok:
                failed.append(f"{path.stem}: {why}")
        return failed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        self.path.unlink(missing_ok=True)


class FleetApp:
    """The worker's ASGI app: its own, plus repository changes applied by every sibling before the answer."""

    def __init__(self, inner: SlipstreamApp, fleet: Fleet) -> None:
        self.inner = inner
        self.fleet = fleet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        change = REPOSITORY_CHANGE.match(scope["path"]) if scope["type"] == "http" else None
        if change is None or scope["method"] != "POST":
            await self.inner(scope, receive, send)
            return
        if self.fleet.loop is None:
            self.fleet.loop = asyncio.get_running_loop()
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.inner(scope, receive, hold)
        if held and held[0].get("status") == 200:
            name, action = change.group(1), change.group(2)
            failed = await asyncio.to_thread(self.fleet.broadcast, action, name)
            if failed:
                log.error("repository %s of '%s' failed on %d sibling worker(s): %s", action, name, len(failed),
                          "; ".join(failed), extra={"model": name, "event": "fleet_change_failed"})  # fmt: skip
            total = len(self.fleet.siblings()) + 1
            applied = f"{total - len(failed)}/{total}".encode()
            held[0] = {**held[0], "headers": [*held[0]["headers"], (b"x-slipstream-workers", applied)]}
        for message in held:
            await send(message)


class WorkerSink:
    """The access log's sink with this worker's pid in each line (``"worker": pid``), so that a line says
    which process served it; one ``replace`` per flush (once per event-loop iteration), not per request."""

    def __init__(self, sink: BinaryIO, pid: int | None = None) -> None:
        self._sink = sink
        self._tag = b'{"worker":%d,' % (pid or os.getpid())

    def write(self, data: bytes) -> int:
        if data.startswith(b"{"):
            data = self._tag + data[1:].replace(b"\n{", b"\n" + self._tag)
        return self._sink.write(data)

    def flush(self) -> None:
        self._sink.flush()
