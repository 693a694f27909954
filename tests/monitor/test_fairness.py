from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from slipstream.monitor.alerts import AlertManager
from slipstream.monitor.fairness import FairnessConfig, FairnessReport, fairness_metrics, fairness_report
from slipstream.monitor.intervals import newcombe_interval, ratio_interval, wilson_interval

Z95 = NormalDist().inv_cdf(0.975)


def fairness_windows(
    rows: int,
    windows: int,
    rate_a: float = 0.1,
    rate_b: float = 0.1,
    *,
    labels: bool = False,
    seed: int = 0,
    config: FairnessConfig | None = None,
) -> dict[str, dict[str, int]]:
    """Simulated windows for calibration: each row joins group a or b at random and is selected with its group's
    rate (labels, when asked, independent of the group: the prediction is right 90 % of the time). Returns, per
    gap, how many windows ended in each status, plus ``{"any": {"flagged": n}}``. rate_a == rate_b is null
    traffic (every flag is a false alarm); rate_b < rate_a measures power. Used by benchmarks/alert_calibration."""
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {"any": {"flagged": 0}}
    for _ in range(windows):
        in_b = rng.random(rows) < 0.5
        pred = (rng.random(rows) < np.where(in_b, rate_b, rate_a)).astype(np.float64)
        y = np.where(rng.random(rows) < 0.9, pred, 1 - pred) if labels else None
        r = fairness_report(np.where(in_b, "b", "a").tolist(), pred, y, config)
        for gap in r.gaps:
            counts.setdefault(gap.metric, {"beyond threshold": 0, "within": 0, "undecided": 0})[gap.status] += 1
        counts["any"]["flagged"] += int(r.flagged)
    return counts


def _two_groups(x_a: int, n_a: int, x_b: int, n_b: int, config: FairnessConfig | None = None) -> FairnessReport:
    groups = ["a"] * n_a + ["b"] * n_b
    pred = np.array([1] * x_a + [0] * (n_a - x_a) + [1] * x_b + [0] * (n_b - x_b), dtype=np.float64)
    return fairness_report(groups, pred, config=config)


def test_metrics_match_a_hand_computation() -> None:
    # group a: 4 rows, group b: 4 rows, one row without a group (ignored).
    groups = ["a", "a", "a", "a", "b", "b", "b", "b", None]
    pred = np.array([1, 1, 0, 1, 0, 0, 1, 0, 1])
    labels = np.array([1, 0, 0, 1, 1, 0, 1, np.nan, 1])
    r = fairness_report(groups, pred, labels, FairnessConfig(min_group_rows=1))
    a, b = r.groups
    # a: selected 3/4; labeled 4, correct: (1,1) (1,0)x (0,0) (1,1) → 3/4; positives rows 0,3 both selected → TPR 1;
    # negatives rows 1,2: row 1 selected → FPR 1/2.
    assert (a.rows, a.labeled, a.selection_rate, a.accuracy, a.tpr, a.fpr) == (4, 4, 0.75, 0.75, 1.0, 0.5)
    # b: selected 1/4; labeled rows 4,5,6 (row 7 NaN): (0,1)x (0,0) (1,1) → 2/3; positives rows 4,6 → TPR 1/2;
    # negatives row 5 → FPR 0.
    assert (b.rows, b.labeled, b.selection_rate, b.tpr, b.fpr) == (4, 3, 0.25, 0.5, 0.0)
    assert b.accuracy == pytest.approx(2 / 3)
    assert r.demographic_parity_difference == pytest.approx(0.5)
    assert r.demographic_parity_ratio == pytest.approx(1 / 3)
    assert r.equalized_odds_difference == pytest.approx(0.5)  # max(TPR gap 0.5, FPR gap 0.5)
    # Every gap is past its threshold at the point, but 4 rows a group cannot tell that from noise.
    assert not r.flagged and [g.status for g in r.gaps] == ["undecided"] * 3
    assert r.comparisons == 4  # 1 pair × (selection difference, ratio, TPR, FPR)
    assert all("not enough rows to judge (need ≈" in reason for reason in r.reasons) and len(r.reasons) == 3


def test_wilson_and_newcombe_reproduce_published_values() -> None:
    # Newcombe (1998), "Interval estimation for the difference between independent proportions", method 10.
    for (x1, n1, x2, n2), (low, high) in {
        (56, 70, 48, 80): (0.0524, 0.3339),
        (9, 10, 3, 10): (0.1705, 0.8090),
        (0, 10, 0, 20): (-0.1611, 0.2775),
        (10, 10, 0, 20): (0.6791, 1.0000),
    }.items():
        lo, hi = newcombe_interval(np.array(x1), np.array(n1), np.array(x2), np.array(n2), Z95)
        assert (round(float(lo), 4), round(float(hi), 4)) == (low, high)
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", method 3 (Wilson).
    single = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (1, 29): (0.0061, 0.1718)}
    for (x, n), (low, high) in single.items():
        lo, hi = wilson_interval(np.array(x), np.array(n), Z95)
        assert (round(float(lo), 4), round(float(hi), 4)) == (low, high)


def test_mover_r_solves_its_defining_equation_and_agrees_with_katz_on_large_counts() -> None:
    x1, n1, x2, n2 = np.array([30, 0, 5]), np.array([300, 80, 40]), np.array([60, 12, 30]), np.array([310, 90, 35])
    low, high = ratio_interval(x1, n1, x2, n2, Z95)
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, Z95)
    l2, u2 = wilson_interval(x2, n2, Z95)
    # MOVER-D lower bound of p1 − L·p2 is zero at L (and the upper bound of p1 − U·p2 at U).
    assert np.allclose(p1 - low * p2 - np.sqrt((p1 - l1) ** 2 + low**2 * (u2 - p2) ** 2), 0, atol=1e-12)
    assert np.allclose(p1 - high * p2 + np.sqrt((u1 - p1) ** 2 + high**2 * (p2 - l2) ** 2), 0, atol=1e-12)
    assert low[1] == 0 and np.all(low <= p1 / p2) and np.all(p1 / p2 <= high)
    big = ratio_interval(np.array(2000), np.array(20000), np.array(4000), np.array(20000), Z95)
    katz = ratio_interval(np.array(2000), np.array(20000), np.array(4000), np.array(20000), Z95, "katz-log")
    assert np.allclose(big, katz, rtol=2e-3)
    # Nothing selected in the denominator group: unbounded above.
    assert ratio_interval(np.array(0), np.array(50), np.array(0), np.array(50), Z95)[1] == np.inf


def test_intervals_cover_at_their_nominal_level() -> None:
    rng = np.random.default_rng(7)
    for n1, n2, p1, p2 in ((60, 60, 0.1, 0.1), (400, 250, 0.05, 0.1), (1000, 1000, 0.08, 0.1)):
        x1, x2 = rng.binomial(n1, p1, 20_000), rng.binomial(n2, p2, 20_000)
        lo, hi = newcombe_interval(x1, n1, x2, n2, Z95)
        assert 0.94 <= np.mean((lo <= p1 - p2) & (p1 - p2 <= hi)) <= 0.975
        for method in ("mover-r", "katz-log"):
            lo, hi = ratio_interval(x1, n1, x2, n2, Z95, method)
            covered = (lo <= p1 / p2) & (p1 / p2 <= hi)
            assert 0.94 <= np.mean(covered) <= 0.985, (n1, p1, method)
            assert np.mean(hi < p1 / p2) <= 0.035  # the side a "below" alert fires on


def test_random_groups_essentially_never_flag() -> None:
    # The case: groups at random, class of interest at ~10 %; point estimates fell below 0.8 in 38-46 %.
    flagged = 0
    for rows in (500, 1000, 2000):
        counts = fairness_windows(rows, 70, 0.1, 0.1, labels=rows == 1000, seed=rows)
        flagged += counts["any"]["flagged"]
    assert flagged <= 1


def test_a_halved_selection_rate_is_flagged_at_2000_rows_with_its_interval() -> None:
    r = _two_groups(200, 1000, 100, 1000)  # 0.20 vs 0.10
    ratio = r.gap("demographic_parity_ratio")
    assert r.flagged and ratio is not None and ratio.status == "beyond threshold" and ratio.pair == ["b", "a"]
    assert ratio.value == pytest.approx(0.5) and ratio.low is not None and ratio.high is not None
    assert 0.3 < ratio.low < 0.5 < ratio.high < 0.8
    assert "demographic parity ratio 0.500 < 0.8: simultaneous 99 % interval" in r.reasons[-1]
    # The difference (0.10) sits on its threshold: undecided, and it says so.
    diff = r.gap("demographic_parity_difference")
    assert diff is not None and diff.status == "undecided" and "the gap sits at the threshold" in diff.reason
    # Drawn at random too: halved in a 2,000-row window is caught in most windows, never in null ones.
    assert fairness_windows(2000, 40, 0.2, 0.1, seed=3)["any"]["flagged"] >= 30


def test_a_tiny_window_says_how_many_rows_it_needs() -> None:
    r = _two_groups(2, 12, 1, 10)
    assert not r.flagged and r.demographic_parity_ratio is None
    ratio = r.gap("demographic_parity_ratio")
    assert ratio is not None and ratio.status == "undecided" and ratio.low is None and ratio.high is None
    assert ratio.needed_rows is not None and ratio.needed_rows > 30
    assert f"not enough rows to judge (need ≈ {ratio.needed_rows:,} per group)" in ratio.reason
    # Above the floor but still too few: the estimate comes from the interval's width and the distance.
    mid = _two_groups(10, 100, 7, 100)
    gap = mid.gap("demographic_parity_ratio")
    assert gap is not None and gap.status == "undecided" and gap.needed_rows is not None
    assert 100 < gap.needed_rows < 100_000 and "need ≈" in gap.reason
    # With that many rows at the same rates the ratio (0.7) is judged.
    n = gap.needed_rows
    again = _two_groups(int(n * 0.1), n, int(n * 0.07), n).gap("demographic_parity_ratio")
    assert again is not None and again.status == "beyond threshold"


def test_equal_treatment_is_within_and_small_groups_are_not_compared() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    groups = rng.choice(["x", "y"], size=n).tolist()
    labels = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < 0.9, labels, 1 - labels)  # same error rate for everyone
    r = fairness_report([*groups, "tiny"], np.append(pred, 1), np.append(labels, 0))
    assert r.compared == ["x", "y"] and [g.group for g in r.groups] == ["tiny", "x", "y"]
    assert not r.flagged, r.reasons
    assert r.demographic_parity_difference is not None and r.demographic_parity_difference < 0.05
    assert {g.metric: g.status for g in r.gaps} == {
        "demographic_parity_difference": "within",
        "demographic_parity_ratio": "within",
        "equalized_odds_difference": "within",
    }
    assert r.reasons == []


def test_thresholds_and_confidence_are_configurable_and_labels_are_optional() -> None:
    loose = _two_groups(30, 50, 25, 50)  # 0.6 vs 0.5
    assert loose.equalized_odds_difference is None and loose.groups[0].accuracy is None
    assert loose.gap("equalized_odds_difference") is None
    assert loose.demographic_parity_difference == pytest.approx(0.1) and not loose.flagged
    strict = FairnessConfig(max_difference=0.05, min_ratio=0.9)
    assert not _two_groups(30, 50, 25, 50, strict).flagged  # 50 rows a group: too few for a 0.1 gap
    big = _two_groups(3000, 5000, 2500, 5000, strict)
    assert big.flagged and [r.split(":")[0] for r in big.reasons] == [
        "demographic parity difference 0.100 > 0.05",
        "demographic parity ratio 0.833 < 0.9",
    ]
    # A lower confidence narrows the intervals; "none" drops the correction.
    wide = _two_groups(60, 500, 40, 500).gap("demographic_parity_ratio")
    narrow = _two_groups(60, 500, 40, 500, FairnessConfig(confidence=0.9, correction="none")).gap(
        "demographic_parity_ratio"
    )
    assert wide is not None and narrow is not None and wide.low is not None and narrow.low is not None
    assert wide.high is not None and narrow.high is not None
    assert wide.low < narrow.low < narrow.high < wide.high


def test_with_many_groups_the_pair_furthest_past_the_threshold_decides() -> None:
    groups = ["a"] * 700 + ["b"] * 700 + ["c"] * 600
    pred = np.array([1] * 140 + [0] * 560 + [1] * 140 + [0] * 560 + [1] * 60 + [0] * 540, dtype=np.float64)
    r = fairness_report(groups, pred)
    assert r.comparisons == 6  # 3 pairs × (difference, ratio)
    ratio = r.gap("demographic_parity_ratio")
    assert ratio is not None and ratio.status == "beyond threshold" and ratio.pair[0] == "c"
    # Bonferroni over 6 comparisons: wider than the same pair judged alone.
    alone = _two_groups(140, 700, 60, 600).gap("demographic_parity_ratio")
    assert alone is not None and alone.high is not None and ratio.high is not None and alone.high < ratio.high


def test_metrics_carry_the_bounds_and_the_default_rules_decide_on_them() -> None:
    alerts = AlertManager()
    null = _two_groups(100, 1000, 90, 1000)  # ratio 0.9: noise could explain the gap
    metrics = fairness_metrics(null)
    assert set(metrics) == {
        f"fairness.{g}{part}"
        for g in ("demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference")
        for part in ("", ".low", ".high")
    }
    assert metrics["fairness.demographic_parity_ratio"] == pytest.approx(0.9)
    low, high = metrics["fairness.demographic_parity_ratio.low"], metrics["fairness.demographic_parity_ratio.high"]
    assert low is not None and high is not None and low < 0.8 < high
    assert metrics["fairness.equalized_odds_difference.low"] is None
    assert alerts.update(metrics, now=0) == []
    (fired,) = alerts.update(fairness_metrics(_two_groups(200, 1000, 100, 1000)), now=1)
    assert fired.rule == "demographic_parity_ratio" and fired.high is not None and fired.high < 0.8
    assert fairness_metrics(None)["fairness.demographic_parity_ratio.high"] is None


def test_the_server_setting_reaches_the_monitor() -> None:
    """The serve options fill the monitor's own FairnessConfig, and the ratio's alert rule takes its threshold."""
    from slipstream.serve.server import settings_from_options

    options = {"monitor": {"config": {"fairness": {"confidence": 0.95, "min_ratio": 0.7}}}}
    config = settings_from_options(options, {}).monitor.config
    assert (config.fairness.confidence, config.fairness.min_ratio) == (0.95, 0.7)
    (rule,) = [r for r in config.alerts.rules if r.name == "demographic_parity_ratio"]
    assert rule.threshold == 0.7
