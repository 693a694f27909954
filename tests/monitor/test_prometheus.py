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


def test_fairness_gaps_are_exported_with_their_interval_bounds(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    monitor = Monitor(model="digits", version="3", profile=digits_profile, store=store)
    registry = CollectorRegistry()
    registry.register(MonitorCollector(lambda: [monitor]))
    for i in range(200):
        feeds = {"pixels": digits.x_live[i : i + 1]}
        monitor.observe(f"r{i}", feeds, digits_engine.run(feeds), latency_s=0.001, group="ab"[i % 2])
    store.flush()
    monitor.feedback_many((f"r{i}", float(digits.y_live[i])) for i in range(200))
    store.flush()
    snap = monitor.evaluate()
    text = generate_latest(registry).decode()
    assert snap.fairness is not None
    for gap in snap.fairness.gaps:
        assert gap.low is not None and gap.high is not None
        for name, value in ((gap.metric, gap.value), (f"{gap.metric}.low", gap.low), (f"{gap.metric}.high", gap.high)):
            line = f'slipstream_monitor_value{{metric="fairness.{name}",model="digits",version="3"}}'
            assert f"{line} {value!r}" in text
    assert {g.metric for g in snap.fairness.gaps} == {
        "demographic_parity_difference",
        "demographic_parity_ratio",
        "equalized_odds_difference",
    }
    monitor.close()
