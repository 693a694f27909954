"""The fleet's drift window, read from the shared prediction log instead of one replica's memory.

The evaluator of a model version (:mod:`slipstream.monitor.fleet`) judges drift on the newest
``window_rows`` rows that *every* replica logged, read back as :class:`PredictionBatch` es, newest first
(the same batch read the store's ``labeled`` uses, ``read_batches``, on the fleet's database). What the log
holds decides what comes from it:

* outputs (those small enough to log, ``max_logged_output_values``), predictions, out-of-distribution
  scores and latencies: always;
* input features: only when the raw inputs are logged (``log_raw_inputs``); they are featurized exactly as
  the in-memory window featurizes them. Without raw inputs the log keeps per-row summary statistics only,
  which are not the profile's features, so those inputs (and string columns' bucket codes, and the
  monitoring-only embedding, which is never logged) come from the evaluator's own window. Behind a load
  balancer that spreads requests, that window is a random sample of the fleet's traffic: fewer rows, the
  same distribution.

Rows from the two sources are not aligned row by row (per-feature tests do not need it; the multivariate
test then runs on the evaluator's rows only when inputs are local).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from slipstream.monitor.features import featurize
from slipstream.monitor.ingest import WindowView
from slipstream.monitor.records import PredictionBatch


def newest_rows(batches: Iterable[PredictionBatch], rows: int) -> list[PredictionBatch]:
    """Batches given newest first, up to the one that brings the total to ``rows``; returned oldest first."""
    taken: list[PredictionBatch] = []
    total = 0
    for batch in batches:
        if total >= rows:
            break
        taken.append(batch)
        total += len(batch)
    return taken[::-1]


def _tail(parts: list[np.ndarray], rows: int) -> np.ndarray | None:
    if not parts:
        return None
    joined = np.concatenate(parts, axis=0)
    return joined[-rows:] if joined.shape[0] > rows else joined


def _column(batches: list[PredictionBatch], name: str, rows: int, kind: str) -> np.ndarray | None:
    """The featurized column ``name`` of ``kind`` ('inputs' or 'outputs') over every batch, or None when one
    batch lacks it (a window mixing rows with and without it would be biased towards the ones with)."""
    parts: list[np.ndarray] = []
    for b in batches:
        source = b.outputs if kind == "outputs" else (b.raw_inputs or {})
        if name not in source:
            return None
        parts.append(featurize(source[name]))
    widths = {p.shape[1] for p in parts}
    return _tail(parts, rows) if len(widths) == 1 else None


def fleet_window(local: WindowView, batches: list[PredictionBatch], rows: int, ood_threshold: float) -> WindowView:
    """The drift window over the fleet's logged ``batches`` (oldest first, see :func:`newest_rows`), with
    what the log does not hold taken from ``local`` (the evaluator's own window; see the module docstring)."""
    if not batches:
        return local
    inputs = dict(local.inputs)
    for name in {n for b in batches for n in (b.raw_inputs or {})}:
        col = _column(batches, name, rows, "inputs")
        if col is not None and (name not in local.inputs or local.inputs[name].shape[1] == col.shape[1]):
            inputs[name] = col
    outputs = dict(local.outputs)
    for name in {n for b in batches for n in b.outputs}:
        col = _column(batches, name, rows, "outputs")
        if col is not None and (name not in local.outputs or local.outputs[name].shape[1] == col.shape[1]):
            outputs[name] = col

    def values(column: str) -> list[np.ndarray]:
        arrays = [getattr(b, column) for b in batches]
        return [a[~np.isnan(a)] for a in arrays if a is not None]

    predicted = _tail(values("prediction"), rows)
    ood = _tail([(s > ood_threshold).astype(np.float64) for s in values("ood_score")], rows)
    return WindowView(
        inputs=inputs,
        outputs=outputs,
        predicted=predicted if predicted is not None and predicted.size else local.predicted,
        ood=ood if ood is not None and ood.size else local.ood,
        latency_ms=_tail([b.latency_ms for b in batches], rows),
    )
