"""The monitor end to end on a real model and real data: in-distribution traffic, then shifted traffic,
with delayed labels, a group treated differently, a real SQLite log and the alert rules."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from slipstream.monitor.logfile import read_records, read_snapshots
from slipstream.monitor.profile import Profile
from slipstream.monitor.service import Monitor, MonitorConfig
from slipstream.monitor.snapshot import MonitorSnapshot
from slipstream.monitor.store import SQLiteStore, StoreConfig
from slipstream.monitor.threats import ThreatConfig
from slipstream.runtime.engine import Engine
from tests.monitor.conftest import Digits


def _serve(monitor: Monitor, engine: Engine, x: np.ndarray, ids: list[str], groups: list[str]) -> None:
    for rid, row, group in zip(ids, x, groups, strict=True):
        feeds = {"pixels": row[None, :]}
        screening = monitor.screen(feeds)
        out = engine.run(feeds)
        monitor.observe(rid, feeds, out, latency_s=0.001, group=group, key_id="client-1", screening=screening)


def _firing(snap: MonitorSnapshot) -> set[str]:
    return {a.rule for a in snap.alerts if a.state == "firing"}


def test_scenario_drift_accuracy_bias_and_every_record_accounted_for(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, digits_bundle: Path, tmp_path: Path
) -> None:
    db = tmp_path / "monitor.db"
    store = SQLiteStore(StoreConfig(path=db))
    monitor = Monitor(
        model="digits",
        version="1",
        profile=digits_profile,
        store=store,
        config=MonitorConfig(window_rows=300, seed=0),
        bundle_dir=digits_bundle,
    )
    # Group "b" is sent mostly digits the model calls 1 less often: its selection rate for class 1 differs.
    clean_x, clean_y = digits.x_live[:450], digits.y_live[:450]
    groups = ["a" if (i % 2 == 0 or y == 1) else "b" for i, y in enumerate(clean_y)]
    snaps: list[MonitorSnapshot] = []
    for start in range(0, 450, 150):
        ids = [f"c{i}" for i in range(start, start + 150)]
        _serve(monitor, digits_engine, clean_x[start : start + 150], ids, groups[start : start + 150])
        store.flush()
        monitor.feedback_many(zip(ids, clean_y[start : start + 150].tolist(), strict=True))
        store.flush()
        snaps.append(monitor.evaluate())
    for snap in snaps:  # zero false alerts on in-distribution traffic
        assert not _firing(snap) & {
            "input_drift",
            "multivariate_drift",
            "prediction_drift",
            "accuracy_drop",
            "estimated_accuracy_drop",
            "out_of_distribution",
            "prediction_log_drops",
        }
        assert snap.drift is not None and snap.drift.judged and snap.drift.drifted_features == []
    before = snaps[-1]
    assert before.quality is not None and before.quality.labeled >= 300 and not before.quality.degraded
    assert before.security.integrity is not None and before.security.integrity.ok

    # Shifted traffic (heavy pixel noise), labels withheld at first.
    shifted = digits.noisy(digits.x_live[:300], scale=6.0)
    ids = [f"s{i}" for i in range(300)]
    _serve(monitor, digits_engine, shifted, ids, groups[:300])
    store.flush()
    unlabeled = monitor.evaluate()
    assert {"input_drift", "multivariate_drift"} <= _firing(unlabeled)
    assert unlabeled.drift is not None and len(unlabeled.drift.drifted_features) > 10
    q = unlabeled.quality
    assert q is not None and before.quality.estimated_accuracy is not None and q.estimated_accuracy is not None
    assert q.estimated_accuracy < before.quality.estimated_accuracy - 0.05  # the estimate moved before labels
    assert "accuracy_drop" not in _firing(unlabeled)
    # Labels arrive: the quality window (newest 500 labels) mixes 300 shifted with 200 clean ones. Its point drop
    # is past 0.05, but its interval still reaches under the limit: not enough evidence yet, no alert.
    monitor.feedback_many(zip(ids, digits.y_live[:300].tolist(), strict=True))
    store.flush()
    labeled = monitor.evaluate()
    mixed = labeled.quality
    assert mixed is not None and mixed.accuracy_drop is not None and mixed.accuracy_drop > 0.05
    assert mixed.accuracy_drop_low is not None and mixed.accuracy_drop_high is not None
    assert mixed.accuracy_drop_low < 0.05 < mixed.accuracy_drop_high and not mixed.degraded
    assert labeled.metrics["quality.accuracy_drop.low"] == mixed.accuracy_drop_low
    assert "not enough evidence" in mixed.reason and "accuracy_drop" not in _firing(labeled)
    assert labeled.security.ood_share is not None and labeled.security.ood_share > 0.5

    # Bias: selection rate of class "1" differs between the groups; the alert fires on the interval, not the point.
    assert labeled.fairness is not None and labeled.fairness.flagged
    ratio = labeled.fairness.gap("demographic_parity_ratio")
    assert ratio is not None and ratio.status == "beyond threshold" and ratio.high is not None and ratio.high < 0.8
    assert "demographic_parity_ratio" in _firing(labeled)

    # More shifted traffic, labeled: the window is all shifted now, the whole interval lies past the limit.
    more = [f"t{i}" for i in range(300, 597)]
    _serve(monitor, digits_engine, digits.noisy(digits.x_live[300:597], scale=6.0), more, ["a", "b"] * 148 + ["a"])
    store.flush()
    monitor.feedback_many(zip(more, digits.y_live[300:597].tolist(), strict=True))
    store.flush()
    confirmed = monitor.evaluate()
    assert confirmed.quality is not None and confirmed.quality.degraded
    assert confirmed.quality.accuracy_drop_low is not None and confirmed.quality.accuracy_drop_low > 0.05
    assert "accuracy_drop" in _firing(confirmed)

    monitor.close()
    counts = store.counts()
    assert counts["dropped"] == 0 and counts["pending"] == 0
    assert counts["written_predictions"] == counts["accepted_predictions"] == confirmed.sampled == 1047
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT SUM(rows) FROM prediction_log").fetchone()[0] == len(read_records(db)) == 1047
    assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 1047
    conn.close()
    stored = read_snapshots(db)
    assert len(stored) == len(snaps) + 3
    assert MonitorSnapshot.model_validate_json(stored[-1].body).metrics == confirmed.metrics


def test_observe_never_raises_and_counts_its_failures(digits_profile: Profile) -> None:
    monitor = Monitor(model="m", version="1", profile=digits_profile, store=None)
    assert monitor.observe("r1", {"pixels": np.zeros((1, 3), np.float32)}, {}, latency_s=0.001)  # queued
    assert monitor.observe("r2", {}, {}, latency_s=0.001)
    snap = monitor.evaluate()  # ingestion finds both broken: counted, nothing raised, nothing in the window
    assert snap.observe_errors == 2 and snap.requests == 0 and snap.drift is None
    monitor.close()


def test_batched_requests_log_one_row_each_and_sampling_is_respected(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    monitor = Monitor(
        model="m",
        version="1",
        profile=digits_profile,
        store=store,
        config=MonitorConfig(sample_rate=0.5, seed=1, log_raw_inputs=True),
    )
    x = digits.x_live[:400]
    for start in range(0, 400, 8):
        feeds = {"pixels": x[start : start + 8]}
        monitor.observe(f"b{start}", feeds, digits_engine.run(feeds), latency_s=0.002)
    snap = monitor.evaluate()
    rows = store.labeled()
    assert snap.rows == 400 and snap.requests == 50 and len(rows) == snap.sampled
    assert 150 < snap.sampled < 250
    assert all("/" in r.request_id for r in rows)
    raw = read_records(tmp_path / "m.db")[0].raw_input
    assert raw is not None and raw["pixels"].shape == (64,)
    monitor.close()


def test_ood_requests_can_be_refused(digits_profile: Profile, digits: Digits) -> None:
    monitor = Monitor(
        model="m",
        version="1",
        profile=digits_profile,
        store=None,
        config=MonitorConfig(threats=ThreatConfig(reject_ood_above=5.0)),
    )
    assert not monitor.screen({"pixels": digits.x_live[:1]}).reject
    verdict = monitor.screen({"pixels": Digits.inverted(digits.x_live[:1])})
    assert verdict.reject and verdict.max_score is not None and verdict.max_score > 5.0
    counters = monitor.counters.snapshot()
    assert counters["rejected"] == {"out_of_distribution": 1} and counters["ood_rejected"] == 1
    monitor.close()


def test_nothing_is_logged_at_rate_zero_but_drift_still_sees_traffic(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    monitor = Monitor(
        model="m",
        version="1",
        profile=digits_profile,
        store=store,
        config=MonitorConfig(sample_rate=0.0, snapshot_to_store=False),
    )
    feeds = {"pixels": digits.x_live[:100]}
    monitor.observe("r", feeds, digits_engine.run(feeds), latency_s=0.01)
    snap = monitor.evaluate()
    assert snap.sampled == 0 and snap.drift is not None and snap.drift.rows == 100
    monitor.close()
    assert store.counts()["written_predictions"] == 0


def test_a_full_pending_buffer_drops_and_counts(digits_profile: Profile, digits: Digits) -> None:
    monitor = Monitor(model="m", version="1", profile=digits_profile, store=None,
                      config=MonitorConfig(max_pending_requests=5))  # fmt: skip
    feeds = {"pixels": digits.x_live[:1]}
    out = {"probabilities": np.full((1, 10), 0.1, np.float32)}
    accepted = [monitor.observe(f"r{i}", feeds, out, latency_s=0.001) for i in range(12)]
    assert accepted == [True] * 5 + [False] * 7
    snap = monitor.evaluate()
    assert snap.requests == 5 and snap.ingest_dropped == 7 and snap.metrics["monitor.ingest_dropped"] == 7
    monitor.close()


def test_the_monitor_thread_ingests_and_close_logs_everything(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    monitor = Monitor(model="m", version="1", profile=digits_profile, store=store,
                      config=MonitorConfig(ingest_interval_s=0.01, evaluate_interval_s=0.05))  # fmt: skip
    monitor.start()
    for i in range(200):
        feeds = {"pixels": digits.x_live[i : i + 1]}
        monitor.observe(f"r{i}", feeds, digits_engine.run(feeds), latency_s=0.001)
    deadline = time.monotonic() + 10
    while (monitor.ingestor.pending or monitor.latest is None) and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread drains and evaluates on its own
    assert monitor.ingestor.pending == 0 and monitor.latest is not None
    monitor.close()
    assert store.counts()["written_predictions"] == 200 and store.counts()["dropped"] == 0
    assert len(read_snapshots(tmp_path / "m.db")) >= 1  # the thread evaluated at least once


def test_without_a_profile_the_monitor_still_logs_and_watches_groups(digits: Digits, tmp_path: Path) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    monitor = Monitor(model="m", version="1", profile=None, store=store)
    for i in range(40):
        monitor.observe(f"r{i}", {"x": digits.x_live[i : i + 1]}, {"y": np.array([[0.3]])}, latency_s=0.002, group="g")
    snap = monitor.evaluate()
    assert snap.requests == 40 and snap.drift is None and snap.quality is None and snap.fairness is None
    assert snap.latency_ms["p50"] == pytest.approx(2.0) and snap.store["written_predictions"] == 40
    monitor.close()


def test_bad_feedback_is_refused_whole_with_every_problem_named(digits_profile: Profile, tmp_path: Path) -> None:
    from slipstream.errors import InputError

    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    monitor = Monitor(model="m", version="1", profile=digits_profile, store=store)
    with pytest.raises(InputError, match=r"'r2': 'seven'.*'': 1") as info:
        monitor.feedback_many([("r1", 3), ("r2", "seven"), ("", 1), ("r4", float("nan"))])
    assert info.value.status_code == 400
    assert monitor.feedback("r1", 3) and monitor.feedback_many([("r2", "4"), ("r3", 5.0)]) == 2
    monitor.close()
    assert store.counts()["written_feedback"] == 3


def test_log_failures_are_counted_and_raise_then_resolve_an_alert(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    db = tmp_path / "m.db"
    store = SQLiteStore(StoreConfig(path=db, busy_timeout_ms=20))
    monitor = Monitor(model="m", version="1", profile=digits_profile, store=store,
                      config=MonitorConfig(snapshot_to_store=False))  # fmt: skip
    feeds = {"pixels": digits.x_live[:50]}
    out = digits_engine.run(feeds)
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # the database is unavailable: every write fails
    try:
        assert monitor.observe("batch-1", feeds, out, latency_s=0.001)
        failing = monitor.evaluate()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert failing.store["dropped_db_error"] == 50 and failing.metrics["store.dropped"] == 50
    assert "prediction_log_drops" in _firing(failing)
    assert monitor.observe("batch-2", feeds, out, latency_s=0.001)
    healthy = monitor.evaluate()
    assert healthy.metrics["store.dropped"] == 0 and healthy.store["written_predictions"] == 50
    assert "prediction_log_drops" not in _firing(healthy)
    assert {a.rule: a.state for a in healthy.alerts}["prediction_log_drops"] == "resolved"
    monitor.close()


def test_monitors_sharing_one_log_see_only_their_own_rows(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "shared.db"))
    clean = Monitor(model="digits", version="1", profile=digits_profile, store=store)
    noisy = Monitor(model="digits", version="2", profile=digits_profile, store=store)
    for name, monitor, x in (("c", clean, digits.x_live[:200]), ("n", noisy, Digits.inverted(digits.x_live[:200]))):
        for i in range(200):
            feeds = {"pixels": x[i : i + 1]}
            monitor.observe(f"{name}{i}", feeds, digits_engine.run(feeds), latency_s=0.001)
        monitor.ingest()
        monitor.feedback_many((f"{name}{i}", float(digits.y_live[i])) for i in range(200))
    a, b = clean.evaluate(), noisy.evaluate()
    assert a.quality is not None and b.quality is not None
    assert a.quality.labeled == b.quality.labeled == 200
    assert a.quality.realized["accuracy"] > 0.8 > 0.3 > b.quality.realized["accuracy"]
    clean.close(close_store=False)
    assert noisy.feedback("n0", 1.0)  # the shared log still takes writes
    noisy.close()
    assert store.counts()["written_predictions"] == 400


def test_each_logged_row_holds_its_stats_outputs_raw_input_and_row_id(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path: Path
) -> None:
    store = SQLiteStore(StoreConfig(path=tmp_path / "rows.db"))
    monitor = Monitor(
        model="digits", version="3", profile=digits_profile, store=store, config=MonitorConfig(log_raw_inputs=True)
    )
    one, two = digits.x_live[:1], digits.x_live[1:3]
    out_one, out_two = digits_engine.run({"pixels": one}), digits_engine.run({"pixels": two})
    monitor.observe("single", {"pixels": one}, out_one, latency_s=0.004, group="a", key_id="k")
    monitor.observe("pair", {"pixels": two}, out_two, latency_s=0.002, group=None, key_id=None)
    monitor.close()  # ingests and writes everything
    rows = read_records(tmp_path / "rows.db")
    assert [r.request_id for r in rows] == ["single", "pair/0", "pair/1"]  # rows of a batched request: ID/ROW
    x = np.concatenate([one, two])
    probs = np.concatenate([out_one["probabilities"], out_two["probabilities"]])
    for i, r in enumerate(rows):
        assert (r.model, r.version) == ("digits", "3")
        assert r.latency_ms == pytest.approx(4.0 if r.request_id == "single" else 2.0)
        assert r.input_stats == pytest.approx(
            {"pixels.mean": x[i].mean(), "pixels.std": x[i].std(), "pixels.min": x[i].min(), "pixels.max": x[i].max()}
        )
        assert r.raw_input is not None
        np.testing.assert_array_equal(r.raw_input["pixels"], x[i])
        np.testing.assert_allclose(r.outputs["probabilities"], probs[i], rtol=1e-6)
        assert r.prediction == int(probs[i].argmax()) and r.confidence == pytest.approx(float(probs[i].max()), rel=1e-6)
        assert (r.group, r.key_id) == (("a", "k") if r.request_id == "single" else (None, None))
