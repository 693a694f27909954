"""Quality metrics: against labels (accuracy, top-k, F1, MAE, RMSE) or against the original model's
outputs when there are no labels (fidelity: cosine similarity, prediction agreement)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from slipstream.errors import ConfigError, DataError

MetricName = Literal["accuracy", "top5", "f1_macro", "mae", "rmse", "cosine", "agreement"]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)

MetricFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Metric:
    """A named metric; ``against`` says whether it compares with labels or with the original's outputs."""

    name: str
    fn: MetricFn
    against: Literal["labels", "reference"]
    higher_is_better: bool = True

    def __call__(self, outputs: np.ndarray, target: np.ndarray) -> float:
        outputs, target = np.asarray(outputs), np.asarray(target)
        if len(outputs) != len(target):
            raise DataError(
                f"Metric '{self.name}' got {len(outputs)} predictions but {len(target)} {self.against}.",
                hint="Give one label (or reference output) per input row.",
            )
        if len(outputs) == 0:
            raise DataError(f"Metric '{self.name}' got no rows to score.")
        return float(self.fn(outputs, target))


def _predicted_class(outputs: np.ndarray) -> np.ndarray:
    """Scores [rows, classes] → argmax; already-decided labels [rows] pass through."""
    return outputs.argmax(axis=-1) if outputs.ndim > 1 and outputs.shape[-1] > 1 else outputs.reshape(len(outputs))


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(_predicted_class(outputs) == labels.reshape(len(labels))))


def top_k_accuracy(k: int) -> MetricFn:
    def fn(outputs: np.ndarray, labels: np.ndarray) -> float:
        if outputs.ndim != 2:
            raise DataError(f"top-{k} accuracy needs scores of shape [rows, classes]; got {list(outputs.shape)}.")
        top = np.argsort(-outputs, axis=1)[:, :k]
        return float(np.mean(np.any(top == labels.reshape(-1, 1), axis=1)))

    return fn


def f1_macro(outputs: np.ndarray, labels: np.ndarray) -> float:
    pred = _predicted_class(outputs)
    truth = labels.reshape(len(labels))
    scores = []
    for cls in np.unique(np.concatenate([truth, pred])):
        tp = np.sum((pred == cls) & (truth == cls))
        fp = np.sum((pred == cls) & (truth != cls))
        fn = np.sum((pred != cls) & (truth == cls))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64)


def mae(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.abs(_flat(outputs) - _flat(labels))))


def rmse(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.sqrt(np.mean((_flat(outputs) - _flat(labels)) ** 2)))


def cosine(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Mean row-wise cosine similarity with the original model's outputs (1.0 = identical direction)."""
    a, b = _flat(outputs), _flat(reference)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))


def agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Share of rows where the predicted class matches the original model's."""
    return float(np.mean(_predicted_class(outputs) == _predicted_class(reference)))


_METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", accuracy, "labels"),
    "top5": Metric("top5", top_k_accuracy(5), "labels"),
    "f1_macro": Metric("f1_macro", f1_macro, "labels"),
    "mae": Metric("mae", mae, "labels", higher_is_better=False),
    "rmse": Metric("rmse", rmse, "labels", higher_is_better=False),
    "cosine": Metric("cosine", cosine, "reference"),
    "agreement": Metric("agreement", agreement, "reference"),
}


def get_metric(
    metric: str | MetricFn, *, against: Literal["labels", "reference"] = "labels", higher_is_better: bool = True
) -> Metric:
    """A metric by name, or a custom callable ``fn(outputs, target) -> float`` wrapped as one."""
    if callable(metric):
        name = getattr(metric, "__name__", "custom")
        return Metric(name, metric, against, higher_is_better)
    if metric not in _METRICS:
        raise ConfigError(
            f"Unknown metric {metric!r}; expected one of {', '.join(METRIC_NAMES)} or a callable.",
            field="metric",
        )
    return _METRICS[metric]
