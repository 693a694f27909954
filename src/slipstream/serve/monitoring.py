"""The server's side of monitoring: one :class:`slipstream.monitor.Monitor` per served model version.

Only built when ``ServeSettings.monitor.db_path`` is set; otherwise the server never imports the monitor
and its request path pays one ``is None`` test. All versions share one SQLite prediction log (one writer
thread); each monitor is created when its version becomes ready (in a worker thread: the profile is read
and the bundle hashed there) and closed, without closing the shared log, when the version retires.
Feedback, the JSON summaries and the dashboard's data are served from here; /metrics gains the monitor's
families through collectors registered on the server's own registry (read at scrape time only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slipstream.errors import InputError, ModelNotFoundError, ProtocolError, SlipstreamError
from slipstream.monitor import (
    FairnessConfig,
    Monitor,
    MonitorConfig,
    QualityConfig,
    SQLiteStore,
    StoreConfig,
    ThreatConfig,
    load_profile,
)
from slipstream.monitor.alerts import DEFAULT_RULES, AlertRule, AlertsConfig
from slipstream.monitor.prometheus import MonitorCollector
from slipstream.serve.settings import MonitorSettings

if TYPE_CHECKING:
    from slipstream.serve.metrics import ServeMetrics
    from slipstream.serve.repository import ModelVersion

log = logging.getLogger("slipstream.serve")

NO_PROFILE = "no reference profile: drift, out-of-distribution scores and estimated accuracy are off"


def monitoring_off() -> ModelNotFoundError:
    return ModelNotFoundError(
        "Monitoring is off on this server.", hint="Start it with --monitor-db FILE to log, watch and take feedback."
    )


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
        # The server ingests on its event loop (ServeMonitors.pump); the monitor thread only evaluates.
        ingest_interval_s=min(1.0, s.evaluate_interval_s),
        quality=QualityConfig(
            window_rows=s.quality_window_rows, min_labeled=s.min_labeled, max_accuracy_drop=s.accuracy_drop_threshold
        ),
        fairness=FairnessConfig(
            positive_label=s.fairness_positive_label,
            max_difference=s.fairness_max_difference,
            min_ratio=s.fairness_min_ratio,
        ),
        threats=ThreatConfig(ood_threshold=s.ood_threshold, reject_ood_above=s.ood_reject_above),
        alerts=AlertsConfig(rules=_rules(s), webhook_url=s.webhook_url),
    )


class ServeMonitors:
    """Every live monitor of one server, and the prediction log they share."""

    def __init__(self, settings: MonitorSettings) -> None:
        if settings.db_path is None:
            raise ValueError("ServeMonitors needs MonitorSettings.db_path")
        self.settings = settings
        self.config = monitor_config(settings)
        self.store = SQLiteStore(
            StoreConfig(
                path=settings.db_path, max_age_s=settings.retention_max_age_s, max_rows=settings.retention_max_rows
            )
        )
        self.active: dict[tuple[str, str], Monitor] = {}
        self.screening = settings.ood_reject_above is not None
        self.started = time.time()

    # -- life cycle (worker threads) ---------------------------------------------------------------
    def attach(self, entry: ModelVersion) -> Monitor:
        """Build and start the monitor of a version that just became ready (blocking: run it in a thread)."""
        try:
            profile = load_profile(entry.path)
        except SlipstreamError as exc:  # a broken profile must not stop serving: monitor without it, say why
            log.error("model %s version %s: unreadable profile, monitoring without it: %s", entry.name,
                      entry.version, exc, extra={"model": entry.name, "version": entry.version})  # fmt: skip
            profile = None
        mon = Monitor(
            model=entry.name,
            version=entry.version,
            profile=profile,
            store=self.store,
            config=self.config,
            bundle_dir=entry.path,
        )
        mon.start()
        self.active[(entry.name, entry.version)] = mon
        return mon

    def detach(self, entry: ModelVersion) -> None:
        """Stop a retired version's monitor; what it observed is still logged (blocking)."""
        mon = entry.monitor
        if mon is None:
            return
        if self.active.get((entry.name, entry.version)) is mon:
            del self.active[(entry.name, entry.version)]
        mon.close(close_store=False)

    def close(self) -> None:
        for mon in list(self.active.values()):
            mon.close(close_store=False)
        self.active.clear()
        self.store.close()

    def monitors(self) -> list[Monitor]:
        return list(self.active.values())

    async def pump(self, interval_s: float = 0.05) -> None:
        """Ingest what was observed, on the event loop, every ``interval_s``.

        Measured: the same work on the monitor's own thread costs the server about twice as much CPU per
        request, because that thread and the event loop then hand the GIL back and forth on every socket
        call. Here it runs between requests, vectorized over everything observed since the last pass.
        """
        while True:
            await asyncio.sleep(interval_s)
            for mon in list(self.active.values()):
                try:
                    mon.ingest()
                except Exception as exc:  # never stop serving over monitoring; the monitor counts its own losses
                    log.exception("monitor ingestion failed: %s", exc)

    # -- JSON ----------------------------------------------------------------------------------------
    def lookup(self, entry: ModelVersion) -> Monitor:
        if entry.monitor is None:
            raise ModelNotFoundError(f"Model '{entry.name}' version {entry.version} has no monitor.")
        return entry.monitor


def summary(mon: Monitor) -> dict[str, Any]:
    """The monitor's latest snapshot as JSON, with whether a reference profile backs it."""
    snap = mon.latest
    doc: dict[str, Any] = snap.model_dump(mode="json") if snap is not None else {"model": mon.model}
    doc["version"] = mon.version
    doc["profile"] = mon.profile is not None
    doc["notes"] = [] if mon.profile is not None else [NO_PROFILE]
    doc["evaluated"] = snap is not None
    return doc


def server_summary(metrics: ServeMetrics, monitors: list[Monitor]) -> dict[str, Any]:
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
        shown = "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InputError(
            f"Every feedback entry needs an 'id' and a numeric 'label'; refused the whole batch for: {shown}.",
            hint="Send labels as numbers (class index or value), keyed by request id.",
        )
    return items


class DriftCollector(Collector):
    """``slipstream_monitor_drift_psi{model,version,feature}`` for each monitor's top drifting features."""

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


def register_collectors(monitors: ServeMonitors, registry: Any) -> None:
    registry.register(MonitorCollector(monitors.monitors))
    registry.register(DriftCollector(monitors))
