"""Expose monitors in Prometheus: a custom collector reading each monitor's latest evaluation.

Register it on the server's own registry (``registry.register(MonitorCollector(lambda: monitors))``); each
scrape reads ``Monitor.latest`` (nothing is computed during a scrape). Needs ``prometheus-client`` (extra
``serve``), imported here only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slipstream.monitor.snapshot import MonitorSnapshot


class Monitored(Protocol):
    """What the collector reads: a :class:`slipstream.monitor.Monitor`, or the server's proxy of one."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def latest(self) -> MonitorSnapshot | None: ...


class MonitorCollector(Collector):
    """``slipstream_monitor_value{model,version,metric}``, ``slipstream_alert_firing{model,version,rule}``,
    ``slipstream_monitor_log_records_total{model,version,outcome}`` and ``slipstream_monitor_security_total``."""

    def __init__(self, monitors: Callable[[], Iterable[Monitored]]) -> None:
        self._monitors = monitors

    def collect(self) -> Iterator[Metric]:
        values = GaugeMetricFamily(
            "slipstream_monitor_value",
            "Monitor metrics from the latest evaluation.",
            labels=["model", "version", "metric"],
        )
        alerts = GaugeMetricFamily(
            "slipstream_alert_firing", "1 while an alert rule fires.", labels=["model", "version", "rule"]
        )
        records = CounterMetricFamily(
            "slipstream_monitor_log_records", "Prediction-log records by outcome (written, dropped_*).",
            labels=["model", "version", "outcome"],
        )  # fmt: skip
        security = CounterMetricFamily(
            "slipstream_monitor_security", "Rejected inputs and failed authentication, by reason.",
            labels=["model", "version", "event", "reason"],
        )  # fmt: skip
        for m in self._monitors():
            snap = m.latest
            if snap is None:
                continue
            ids = [m.model, m.version]
            for name, value in snap.metrics.items():
                if value is not None:
                    values.add_metric([*ids, name], value)
            for state in snap.alerts:
                alerts.add_metric([*ids, state.rule], float(state.state == "firing"))
            for key, count in snap.store.items():
                if key.startswith(("written_", "dropped_")):
                    records.add_metric([*ids, key], float(count))
            for event in ("rejected", "auth_failed"):
                reasons = snap.security.counters.get(event, {})
                for reason, count in reasons.items() if isinstance(reasons, dict) else []:
                    security.add_metric([*ids, event, reason], float(count))
        yield from (values, alerts, records, security)
