"""Run a model over a dataset and score it: against labels, or against the original model's outputs."""

from __future__ import annotations

import numpy as np

from slipstream.data.datasets import Dataset
from slipstream.errors import DataError
from slipstream.evaluate.metrics import Metric
from slipstream.runtime.base import EngineBase


def predict(engine: EngineBase, dataset: Dataset, batch_size: int = 256, output: str | None = None) -> np.ndarray:
    """The model's ``output`` (default: its first) for every row, batched."""
    name = output or engine.outputs[0].name
    parts = [engine.run(feeds, [name])[name] for feeds, _ in dataset.batches(batch_size)]
    return np.concatenate(parts)


def score(metric: Metric, outputs: np.ndarray, dataset: Dataset, reference: np.ndarray | None = None) -> float:
    """Apply ``metric`` against the dataset's labels or the reference outputs, as the metric needs."""
    if metric.against == "labels":
        if dataset.labels is None:
            raise DataError(
                f"Metric '{metric.name}' needs labels, but {dataset.source} has none.",
                source=dataset.source,
                hint="Add a 'labels' array/column, or use a fidelity metric (cosine, agreement).",
            )
        return metric(outputs, dataset.labels)
    if reference is None:
        raise DataError(f"Metric '{metric.name}' compares with the original model's outputs; none were given.")
    return metric(outputs, reference)
