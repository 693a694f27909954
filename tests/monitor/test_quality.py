from __future__ import annotations

import numpy as np
import pytest

from slipstream.monitor.profile import Profile, build_profile
from slipstream.monitor.quality import QualityConfig, QualityMonitor, calibrated, drop_interval
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
    # Without labels the estimate's interval already lies above the limit (the drop is large).
    assert unlabeled.estimated_drop_low is not None and unlabeled.estimated_drop_high is not None
    assert 0.05 < unlabeled.estimated_drop_low < unlabeled.estimated_drop < unlabeled.estimated_drop_high
    assert clean.estimated_drop_low is not None and clean.estimated_drop_low < 0.05
    labeled_rows = _rows(digits_engine, noisy_x, digits.y_live)
    labeled = monitor.evaluate(labeled_rows, labeled_rows)
    assert labeled.degraded and labeled.accuracy_drop is not None and labeled.accuracy_drop > 0.05
    assert labeled.accuracy_drop_low is not None and labeled.accuracy_drop_low > 0.05
    assert "all of it above the limit" in labeled.reason and labeled.interval == "newcombe-wilson(95%)"


def _graded(profile: Profile, correct: int, wrong: int) -> list[LabeledRow]:
    return [
        LabeledRow(f"r{i}", float(i), 1.0, 0.99, 1.0 if i < correct else 2.0, None, None, 1.0, None)
        for i in range(correct + wrong)
    ]


def test_a_five_point_drop_on_fifty_labels_is_not_enough_evidence(digits_profile: Profile) -> None:
    ref = digits_profile.metrics["accuracy"]
    wrong = int(np.ceil((1 - ref + 0.07) * 50))  # a point drop of at least 7 points on 50 labels
    rows = _graded(digits_profile, 50 - wrong, wrong)
    report = QualityMonitor(digits_profile).evaluate(rows, rows)
    assert report.accuracy_drop is not None and report.accuracy_drop > 0.05
    assert report.accuracy_drop_low is not None and report.accuracy_drop_high is not None
    assert report.accuracy_drop_low < 0.05 < report.accuracy_drop_high
    assert not report.degraded and "not enough evidence" in report.reason
    # The same share of errors on 2,000 labels is decided.
    many = _graded(digits_profile, 40 * (50 - wrong), 40 * wrong)
    assert QualityMonitor(digits_profile).evaluate(many, many).degraded


def test_the_drop_interval_matches_published_values() -> None:
    z = 1.959964
    # Wilson (1927) for 8 of 10: 0.4902 to 0.9433; with an exact build-time accuracy of 1 the drop is 1 minus it.
    assert drop_interval(1.0, None, 0.8, 10, z) == pytest.approx((1 - 0.9433, 1 - 0.4902), abs=1e-4)
    assert drop_interval(1.0, None, 1.0, 10, z) == pytest.approx((0.0, 0.2775), abs=1e-4)  # 10 of 10
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339.
    assert drop_interval(56 / 70, 70, 48 / 80, 80, z) == pytest.approx((0.0524, 0.3339), abs=1e-4)


@pytest.mark.parametrize("accuracy", [0.8, 0.95, 0.99])
def test_the_interval_rule_false_alarm_rate_is_under_one_percent_exactly(accuracy: float) -> None:
    """Every outcome of a 50-label window at the build-time accuracy, weighted by its binomial probability:
    the chance that the drop's interval lies wholly above 0.05 (the alert) is under 1 %; the bare point rule
    (drop > 0.05) fires 4 % (at 95 %) to 19 % (at 80 %) of the time."""
    from scipy.stats import binom

    n, z = 50, 1.959964
    k = np.arange(n + 1)
    p = binom.pmf(k, n, accuracy)
    low = np.array([drop_interval(accuracy, 500, c / n, n, z)[0] for c in k])
    assert float(p[low > 0.05].sum()) < 0.01
    if accuracy < 0.99:
        assert float(p[accuracy - k / n > 0.05].sum()) > 0.03


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


def test_one_unsure_prediction_does_not_decide_the_estimated_drop(digits_profile: Profile) -> None:
    """A single low-confidence prediction has a low point estimate; the interval keeps the alert undecided."""
    one = [LabeledRow("r0", 0.0, 3.0, 0.3, None, None, None, 1.0, None)]
    report = QualityMonitor(digits_profile).evaluate(one, [])
    assert report.estimated_drop is not None and report.estimated_drop > 0.05
    assert report.estimated_drop_low is not None and report.estimated_drop_low < 0.05
    many = [LabeledRow(f"r{i}", float(i), 3.0, 0.3, None, None, None, 1.0, None) for i in range(500)]
    decided = QualityMonitor(digits_profile).evaluate(many, [])
    assert decided.estimated_drop_low is not None and decided.estimated_drop_low > 0.05
