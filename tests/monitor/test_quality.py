from __future__ import annotations

import numpy as np
import pytest

from slipstream.monitor.profile import Profile, build_profile
from slipstream.monitor.quality import QualityConfig, QualityMonitor, calibrated
from slipstream.monitor.records import LabeledRow
from slipstream.runtime.engine import Engine
from tests.monitor.conftest import Digits


def _rows(engine: Engine, x: np.ndarray, y: np.ndarray | None) -> list[LabeledRow]:
    probs = engine.run({"pixels": x})["probabilities"]
    return [
        LabeledRow(
            request_id=f"r{i}",
            ts=float(i),
            prediction=float(p.argmax()),
            confidence=float(p.max()),
            label=None if y is None else float(y[i]),
            group=None,
            key_id=None,
            latency_ms=1.0,
            ood_score=None,
        )
        for i, p in enumerate(probs)
    ]


def test_realized_accuracy_matches_a_hand_count_and_stays_healthy_in_distribution(
    digits_profile: Profile, digits: Digits, digits_engine: Engine
) -> None:
    rows = _rows(digits_engine, digits.x_live, digits.y_live)
    report = QualityMonitor(digits_profile).evaluate(rows, rows)
    hand = np.mean([r.prediction == r.label for r in rows])
    assert report.realized["accuracy"] == pytest.approx(hand)
    assert report.labeled == len(rows) == report.predictions
    assert not report.degraded and "drop" in report.reason
    # The label-free estimate lands near the realized accuracy on in-distribution data.
    assert report.estimated_accuracy == pytest.approx(report.realized["accuracy"], abs=0.05)
    assert report.estimate_method is not None and report.estimate_method.startswith("cbpe(histogram_binning")


def test_shift_is_flagged_from_labels_and_the_estimate_moves_without_them(
    digits_profile: Profile, digits: Digits, digits_engine: Engine
) -> None:
    monitor = QualityMonitor(digits_profile, QualityConfig(max_accuracy_drop=0.05))
    clean = monitor.evaluate(_rows(digits_engine, digits.x_live, None), [])
    noisy_x = digits.noisy(digits.x_live, scale=6.0)
    unlabeled = monitor.evaluate(_rows(digits_engine, noisy_x, None), [])
    assert unlabeled.labeled == 0 and not unlabeled.degraded and "needed for a verdict" in unlabeled.reason
    assert clean.estimated_accuracy is not None and unlabeled.estimated_accuracy is not None
    assert unlabeled.estimated_accuracy < clean.estimated_accuracy - 0.05
    labeled_rows = _rows(digits_engine, noisy_x, digits.y_live)
    labeled = monitor.evaluate(labeled_rows, labeled_rows)
    assert labeled.degraded and labeled.accuracy_drop is not None and labeled.accuracy_drop > 0.05


def test_calibration_maps_confidence_through_the_reference_bins(digits_profile: Profile) -> None:
    cal = digits_profile.calibration
    assert cal is not None
    values = calibrated(cal, np.array([0.0, 1.0]))
    assert values[0] == cal.accuracy[0] and values[1] == cal.accuracy[-1]


def test_regression_quality_uses_mae() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = x.sum(axis=1)
    profile = build_profile({"x": x}, {"y": (y + rng.normal(0, 0.1, 300)).reshape(-1, 1)}, y)
    rows = [
        LabeledRow(f"r{i}", float(i), float(y[i] + 1.0), None, float(y[i]), None, None, 1.0, None) for i in range(60)
    ]
    report = QualityMonitor(profile).evaluate(rows, rows)
    assert report.task == "regression" and report.realized["mae"] == pytest.approx(1.0)
    assert report.degraded and report.estimated_accuracy is None
    assert QualityMonitor(profile, QualityConfig(window="time", window_s=60)).query(100.0) == {
        "since_ts": 40.0,
        "limit": None,
    }
