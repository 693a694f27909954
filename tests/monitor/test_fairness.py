from __future__ import annotations

import numpy as np
import pytest

from slipstream.monitor.fairness import FairnessConfig, fairness_report


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
    assert r.flagged and len(r.reasons) == 3


def test_equal_treatment_is_not_flagged_and_small_groups_are_not_compared() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    groups = rng.choice(["x", "y"], size=n).tolist()
    labels = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < 0.9, labels, 1 - labels)  # same error rate for everyone
    r = fairness_report([*groups, "tiny"], np.append(pred, 1), np.append(labels, 0))
    assert r.compared == ["x", "y"] and [g.group for g in r.groups] == ["tiny", "x", "y"]
    assert not r.flagged, r.reasons
    assert r.demographic_parity_difference is not None and r.demographic_parity_difference < 0.05


def test_thresholds_are_configurable_and_labels_are_optional() -> None:
    groups = ["a"] * 50 + ["b"] * 50
    pred = np.array([1] * 30 + [0] * 20 + [1] * 25 + [0] * 25)  # 0.6 vs 0.5
    loose = fairness_report(groups, pred)
    assert loose.equalized_odds_difference is None and loose.groups[0].accuracy is None
    assert loose.demographic_parity_difference == pytest.approx(0.1) and not loose.flagged
    strict = fairness_report(groups, pred, config=FairnessConfig(max_difference=0.05, min_ratio=0.9))
    assert strict.flagged and strict.reasons == [
        "demographic parity difference 0.100 > 0.05",
        "demographic parity ratio 0.833 < 0.9",
    ]
