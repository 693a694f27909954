"""The server's side of monitoring: one monitor process, one :class:`RemoteMonitor` per served version.

Only built when ``ServeSettings.monitor.store`` is set; otherwise the server never imports the monitor
and its request path pays one ``is None`` test. The monitors, their shared SQLite prediction log and their
evaluations live in a separate process (:mod:`slipstream.monitor.process.worker`), started with the first
monitored version and restarted when it dies (:mod:`slipstream.monitor.process.supervisor`); the server keeps
the cheap part (:mod:`slipstream.monitor.process.proxy`). Feedback, the
JSON summaries and the dashboard's data are served from here; /metrics gains the monitor's families through
collectors registered on the server's own registry (read at scrape time only).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slipstream.errors import InputError, ModelNotFoundError, ProtocolError, SlipstreamError, first_few
from slipstream.monitor import load_profile
from slipstream.monitor.process.placement import pin_thread, plan
from slipstream.monitor.process.proxy import RemoteMonitor
from slipstream.monitor.process.supervisor import Supervisor
from slipstream.monitor.process.worker import Key
from slipstream.monitor.prometheus import MonitorCollector
from slipstream.monitor.store import prepare_store
from slipstream.serve.settings import MonitorServing

if TYPE_CHECKING:
    from slipstream.serve.metrics import ServeMetrics
    from slipstream.serve.repository import ModelVersion

log = logging.getLogger("slipstream.serve")

NO_PROFILE = "no reference profile: drift, out-of-distribution scores and estimated accuracy are off"


def monitoring_off() -> ModelNotFoundError:
    return ModelNotFoundError(
        "Monitoring is off on this server.", hint="Start it with --monitor-db FILE to log, watch and take feedback."
    )


class ServeMonitors:
    """Every live monitor of one server, and the process they run in."""

    def __init__(self, settings: MonitorServing) -> None:
        store = settings.required_store("Monitoring")
        self.settings = settings
        self.config = settings.config  # the one config: the monitor process receives this same object
        prepare_store(store)  # an unwritable log fails here, before anything is served
        self.active: dict[Key, RemoteMonitor] = {}
        self.screening = settings.config.threats.reject_ood_above is not None
        self.process: Supervisor | None = None
        # (address, worker name) of the monitor process the parent of ``serve --workers N`` runs for all its
        # workers (slipstream.monitor.process.shared); None: this server starts its own.
        self.shared: tuple[str, str] | None = None
        self._start_lock = threading.Lock()
        self.placement = plan(settings.placement)

    def place_event_loop(self) -> None:
        """Called on the event loop's thread once the models are loaded (see slipstream.monitor.process.placement)."""
        pin_thread(self.placement.loop)  # and so the threads the loop starts from now on
        log.info("monitoring placement: %s", self.placement.describe())

    # -- life cycle (worker threads) ---------------------------------------------------------------
    def _process(self) -> Supervisor:
        with self._start_lock:
            if self.process is None:
                started = time.perf_counter()
                if self.shared is not None:
                    from slipstream.monitor.process.shared import SharedMonitor

                    address, worker = self.shared
                    self.process = SharedMonitor(
                        self.settings, address=address, worker=worker, on_snapshot=self._on_snapshot
                    )
                else:
                    self.process = Supervisor(self.settings, cpus=self.placement.monitor, on_snapshot=self._on_snapshot)
                log.info("monitor process %d started in %.2f s, logging to %s", self.process.process.pid,
                         time.perf_counter() - started, self.settings.log_location)  # fmt: skip
            return self.process

    @property
    def health(self) -> str:
        """Readiness details: ``degraded`` while the monitor process is down (serving goes on), else ``ok``."""
        return "ok" if self.process is None else self.process.state

    def status(self) -> dict[str, Any]:
        """The monitor process and the accounting of every observed prediction (row), for the JSON summary."""
        return {"state": "not started", "restarts": 0} if self.process is None else process_status(self.process)

    def flush(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Ship what was observed, have the process write it and acknowledge it; the accounting after
        (blocking: worker threads). Settled: ``pending`` is 0 when traffic has stopped."""
        for mon in list(self.active.values()):
            mon.ship()
        process = self.process
        if process is None:
            return {}
        if process.alive:
            process.call("flush", timeout_s=timeout_s)
        else:
            process.wait_settled(timeout_s)
        return process.totals()

    def _on_snapshot(self, key: Key, doc: str) -> None:
        mon = self.active.get(key)
        if mon is not None:
            mon.set_latest(doc)

    def attach(self, entry: ModelVersion) -> RemoteMonitor:
        """Start monitoring a version that just became ready (blocking: run it in a thread)."""
        try:
            profile = load_profile(entry.path)
        except SlipstreamError as exc:  # a broken profile must not stop serving: monitor without it, say why
            log.error("model %s version %s: unreadable profile, monitoring without it: %s", entry.name,
                      entry.version, exc, extra={"model": entry.name, "version": entry.version})  # fmt: skip
            profile = None
        process = self._process()
        process.attach((entry.name, entry.version), str(entry.path), profile)
        mon = RemoteMonitor(process, entry.name, entry.version, profile, self.config)
        self.active[mon.key] = mon
        return mon

    def detach(self, entry: ModelVersion) -> None:
        """Stop a retired version's monitor once what it observed is shipped (blocking)."""
        mon = entry.monitor
        if mon is None:
            return
        mon.ship()
        if self.active.get(mon.key) is mon:
            del self.active[mon.key]
        mon.process.detach(mon.key)

    def close(self) -> None:
        """Ship what is left, let the process write it all and exit (blocking)."""
        for mon in list(self.active.values()):
            mon.ship()
        self.active.clear()
        if self.process is not None:
            self.process.close()
            t = self.process.totals()
            log.info("monitor process closed: of %d prediction(s) observed, %d written, %d dropped %s, %d lost, "
                     "%d unaccounted", t["observed"], t["written"], sum(t["dropped"].values()), t["dropped"],
                     t["lost"], t["pending"], extra={"event": "monitor_accounting", **t})  # fmt: skip

    def monitors(self) -> list[RemoteMonitor]:
        return list(self.active.values())

    async def pump(self, interval_s: float = 0.05) -> None:
        """Ship what was observed to the monitor process, every ``interval_s``, from the event loop
        (a concatenation per tensor; the sender thread pickles it into the pipe)."""
        while True:
            await asyncio.sleep(interval_s)
            for mon in list(self.active.values()):
                try:
                    mon.ship()
                except Exception as exc:  # never stop serving over monitoring
                    log.exception("shipping to the monitor process failed: %s", exc)

    # -- JSON ----------------------------------------------------------------------------------------
    def lookup(self, entry: ModelVersion) -> RemoteMonitor:
        if entry.monitor is None:
            raise ModelNotFoundError(f"Model '{entry.name}' version {entry.version} has no monitor.")
        return entry.monitor


def process_status(process: Supervisor) -> dict[str, Any]:
    """Whether the monitor process runs, its restarts and why it last stopped, and the accounting of every
    observed prediction: observed = written + dropped + lost + pending."""
    return {
        "state": process.state,
        "pid": process.process.pid,
        "restarts": process.restarts,
        "last_exit": process.last_exit,
        "standby": process.standby,
        "last_outage_s": process.last_outage_s,
        "predictions": process.totals(),
    }


def summary(mon: RemoteMonitor) -> dict[str, Any]:
    """The monitor's latest snapshot as JSON, with whether a reference profile backs it."""
    snap = mon.latest
    doc: dict[str, Any] = snap.model_dump(mode="json") if snap is not None else {"model": mon.model}
    doc["version"] = mon.version
    doc["profile"] = mon.profile is not None
    doc["notes"] = [] if mon.profile is not None else [NO_PROFILE]
    if not mon.process.alive:
        doc["notes"].append(
            f"the monitor process stopped ({mon.process.exit_reason}) and is restarting: these numbers are stale"
        )
    doc["evaluated"] = snap is not None
    doc["monitor_process"] = process_status(mon.process)
    return doc


def server_summary(metrics: ServeMetrics, monitors: list[RemoteMonitor]) -> dict[str, Any]:
    """What the dashboard polls: live request counts and mean latency per model, refusals by reason, and
    every monitored version's latest summary."""
    requests: dict[str, dict[str, int]] = {}
    for (model, _version, status), count in metrics.requests.items():
        per_model = requests.setdefault(model, {})
        per_model[status] = per_model.get(status, 0) + count
    latency = {}
    for model, series in metrics.series.items():
        n = sum(series.total.counts)
        latency[model] = {"requests": n, "mean_ms": 1000 * series.total.total / max(1, n)}
    rejections: dict[str, float] = {}
    for family in metrics.rejections.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                rejections[sample.labels["reason"]] = sample.value
    return {
        "at": time.time(),
        "requests": requests,
        "latency": latency,
        "rejections": rejections,
        "models": [summary(m) for m in monitors],
        "monitor_process": process_status(monitors[0].process) if monitors else None,
    }


def parse_feedback(body: bytes) -> list[tuple[str, float]]:
    """``{"id": ..., "label": ...}`` or ``{"labels": [{"id": ..., "label": ...}, ...]}``; 400 names bad entries."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"The feedback body is not valid JSON ({exc}).") from exc
    if isinstance(doc, dict) and "labels" in doc:
        entries = doc["labels"]
        if not isinstance(entries, list) or not entries:
            raise ProtocolError('\'labels\' must be a non-empty list of {"id": ..., "label": ...} objects.')
    elif isinstance(doc, dict) and "id" in doc:
        entries = [doc]
    else:
        raise ProtocolError(
            'Feedback must be {"id": ..., "label": ...} or {"labels": [{"id": ..., "label": ...}, ...]}.',
            hint="The id is the request's id (the response's 'id', else its X-Request-Id header; rows of a "
            "batched request are 'ID/ROW').",
        )
    items: list[tuple[str, float]] = []
    bad: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "label" not in entry:
            bad.append(f"entry {i}: {entry!r}"[:80])
            continue
        label = entry["label"]
        if isinstance(label, bool) or not isinstance(label, int | float):
            bad.append(f"entry {i}: label {label!r}"[:80])
            continue
        items.append((entry["id"], float(label)))
    if bad:
        raise InputError(
            "Every feedback entry needs an 'id' and a numeric 'label'; refused the whole batch for: "
            f"{first_few(bad, '; ')}.",
            hint="Send labels as numbers (class index or value), keyed by request id.",
        )
    return items


class ServerMonitorCollector(Collector):
    """``slipstream_monitor_drift_psi{model,version,feature}`` for each monitor's top drifting features;
    whether the monitor process runs (``slipstream_monitor_process_up``), its restarts
    (``slipstream_monitor_restarts_total``), and the fate of every observed prediction
    (``slipstream_monitor_predictions_total{outcome,reason}``: observed, written, dropped by reason, lost,
    pending; ``slipstream_monitor_requests_lost_total`` is the lost ones, kept under its earlier name)."""

    def __init__(self, monitors: ServeMonitors) -> None:
        self._monitors = monitors

    def collect(self) -> Iterator[Metric]:
        psi = GaugeMetricFamily(
            "slipstream_monitor_drift_psi",
            "PSI of the input features that drift most, window vs reference profile.",
            labels=["model", "version", "feature"],
        )
        for mon in self._monitors.monitors():
            snap = mon.latest
            if snap is not None and snap.drift is not None:
                for f in snap.drift.top:
                    psi.add_metric([mon.model, mon.version, f.feature], f.psi)
        yield psi
        process = self._monitors.process
        if process is not None:
            yield GaugeMetricFamily(
                "slipstream_monitor_process_up", "1 while the monitor process runs.", value=float(process.alive)
            )
            yield CounterMetricFamily(
                "slipstream_monitor_restarts", "Restarts of the monitor process after it died.", value=process.restarts
            )
            totals = process.totals()
            yield CounterMetricFamily(
                "slipstream_monitor_requests_lost",
                "Observed predictions (rows) lost to a monitor process that was down or died before writing them.",
                value=float(totals["lost"]),
            )
            fates = CounterMetricFamily(
                "slipstream_monitor_predictions",
                "Observed predictions (rows) by fate: observed = written + dropped + lost + pending.",
                labels=["outcome", "reason"],
            )
            for outcome in ("observed", "written", "lost"):
                fates.add_metric([outcome, ""], float(totals[outcome]))
            for reason, n in totals["dropped"].items():
                fates.add_metric(["dropped", reason], float(n))
            yield fates
            yield GaugeMetricFamily(
                "slipstream_monitor_predictions_pending",
                "Observed predictions (rows) not yet written, dropped or lost (queued or in flight).",
                value=float(totals["pending"]),
            )


def register_collectors(monitors: ServeMonitors, registry: Any) -> None:
    registry.register(MonitorCollector(monitors.monitors))
    registry.register(ServerMonitorCollector(monitors))
