from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, top_k_accuracy_score

from slipstream.errors import ConfigError, DataError
from slipstream.evaluate.metrics import get_metric

RNG = np.random.default_rng(0)
SCORES = RNG.standard_normal((200, 6))
LABELS = RNG.integers(0, 6, 200)


def test_classification_metrics_match_scikit_learn() -> None:
    pred = SCORES.argmax(axis=1)
    assert get_metric("accuracy")(SCORES, LABELS) == pytest.approx(accuracy_score(LABELS, pred))
    assert get_metric("f1_macro")(SCORES, LABELS) == pytest.approx(f1_score(LABELS, pred, average="macro"))
    assert get_metric("top5")(SCORES, LABELS) == pytest.approx(top_k_accuracy_score(LABELS, SCORES, k=5))
    assert get_metric("accuracy")(pred, LABELS) == pytest.approx(accuracy_score(LABELS, pred))


def test_regression_metrics() -> None:
    y = RNG.standard_normal(50)
    p = y + 0.5
    assert get_metric("mae")(p, y) == pytest.approx(mean_absolute_error(y, p))
    assert get_metric("rmse")(p, y) == pytest.approx(0.5)
    assert not get_metric("rmse").higher_is_better


def test_fidelity_against_the_original() -> None:
    emb = RNG.standard_normal((32, 16))
    assert get_metric("cosine")(emb, emb) == pytest.approx(1.0)
    assert get_metric("cosine")(-emb, emb) == pytest.approx(-1.0)
    assert get_metric("cosine").against == "reference"
    assert get_metric("agreement")(SCORES, SCORES + 1e-9) == 1.0


def test_custom_and_unknown_metrics() -> None:
    def worst_error(outputs: np.ndarray, target: np.ndarray) -> float:
        return float(np.max(np.abs(outputs - target)))

    metric = get_metric(worst_error, higher_is_better=False)
    assert metric.name == "worst_error" and metric(np.array([1.0, 4.0]), np.array([1.0, 1.0])) == 3.0
    with pytest.raises(ConfigError, match="Unknown metric 'acc'"):
        get_metric("acc")
    with pytest.raises(DataError, match="3 predictions but 2 labels"):
        get_metric("accuracy")(np.zeros(3), np.zeros(2))
