from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from slipstream.monitor.profile import Profile
from slipstream.monitor.prometheus import MonitorCollector
from slipstream.monitor.service import Monitor
from slipstream.monitor.store import SQLiteStore, StoreConfig
from slipstream.runtime.engine import Engine
from tests.monitor.conftest import Digits


def test_collector_exports_metrics_alerts_and_log_counts(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    monitor = Monitor(
        model="digits", version="3", profile=digits_profile, store=SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    )
    registry = CollectorRegistry()
    registry.register(MonitorCollector(lambda: [monitor]))
    assert b"slipstream_monitor_value{" not in generate_latest(registry)  # nothing before the first evaluation
    x = Digits.inverted(digits.x_live[:100])
    for i in range(100):
        feeds = {"pixels": x[i : i + 1]}
        monitor.observe(f"r{i}", feeds, digits_engine.run(feeds), latency_s=0.001)
    monitor.counters.rejected("bad_shape")
    monitor.evaluate()
    text = generate_latest(registry).decode()
    assert 'slipstream_monitor_value{metric="drift.multivariate_drifted",model="digits",version="3"} 1.0' in text
    assert 'slipstream_alert_firing{model="digits",rule="input_drift",version="3"} 1.0' in text
    assert (
        'slipstream_monitor_log_records_total{model="digits",outcome="written_predictions",version="3"} 100.0' in text
    )
    assert (
        'slipstream_monitor_security_total{event="rejected",model="digits",reason="bad_shape",version="3"} 1.0' in text
    )
    monitor.close()
