"""Model quality in production: realized accuracy from delayed labels, and a label-free estimate.

Realized: accuracy and macro F1 (classifiers) or MAE (regressors) over the newest ``window_rows`` labeled
predictions, or those of the last ``window_s`` seconds, compared with the accuracy measured at build time
(the profile). Estimated (CBPE-style, classifiers only): each prediction's top-class confidence is mapped
through the calibration learnt on the reference (histogram binning of confidence against correctness), and
the mean calibrated confidence over recent predictions estimates accuracy before any label arrives.

Both come with an interval, and the verdict reads the interval, not the point: 50 labels at 99 % build-time
accuracy show a 5-point drop by chance in about 1 window of 10, so a bare ``drop > 0.05`` cries wolf.

* Realized drop: Newcombe's hybrid score interval for a difference of two proportions, from the Wilson
  intervals of the build-time accuracy (its ``labeled_rows``) and of the window's accuracy. Wilson keeps its
  coverage at accuracies near 1 and at a few dozen labels, where the normal (Wald) interval collapses.
* Estimated drop: the estimate is a mean of per-row probabilities, each in [0, 1], so its sampling spread is
  at most that of a proportion over the same rows: the Wilson interval of the estimate over the window's
  predictions is a safe bound at any window size, widened in quadrature by the calibration's own error (each
  confidence bin's accuracy was learnt from a finite number of reference rows; a shifted window leans on the
  sparse low-confidence bins). The build-time accuracy counts as exact here: its error and the calibration's
  come from the same reference rows and cancel in the difference on in-distribution traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import Field

from slipstream.evaluate.metrics import f1_macro
from slipstream.frozen import Frozen
from slipstream.monitor.intervals import newcombe_interval, wilson_interval
from slipstream.monitor.profile import Calibration, Profile
from slipstream.monitor.records import LabeledRow


class QualityConfig(Frozen):
    window: Literal["count", "time"] = Field(default="count", description="Window by row count or by age.")
    window_rows: int = Field(default=500, ge=1, description="Count window: the newest rows considered.")
    window_s: float = Field(default=3600.0, gt=0, description="Time window: rows of the last this many seconds.")
    min_labeled: int = Field(default=50, ge=1, description="Fewer labeled rows than this: no realized verdict.")
    max_accuracy_drop: float = Field(
        default=0.05, ge=0, description="Alert when build-time accuracy minus realized accuracy exceeds this."
    )
    confidence: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="Two-sided level of the intervals on the realized and the estimated accuracy drop; a verdict "
        "needs the whole interval past max_accuracy_drop.",
    )
    max_mae_increase: float = Field(
        default=0.25, ge=0, description="Regressors: alert when realized MAE exceeds build-time MAE by this share."
    )


class QualityReport(Frozen):
    task: Literal["classification", "regression"]
    window: str = Field(description="The window actually used, e.g. 'last 500 rows' or 'last 3600 s'.")
    predictions: int = Field(description="Predictions in the window (labeled or not).")
    labeled: int = Field(description="Labeled predictions in the window.")
    realized: dict[str, float] = Field(description="accuracy + f1_macro, or mae, on labeled rows.")
    reference: dict[str, float] = Field(description="The same metrics at build time (from the profile).")
    accuracy_drop: float | None = Field(default=None, description="Build-time minus realized accuracy.")
    accuracy_drop_low: float | None = Field(default=None, description="Lower bound of the drop's interval.")
    accuracy_drop_high: float | None = Field(default=None, description="Upper bound of the drop's interval.")
    estimated_accuracy: float | None = Field(default=None, description="CBPE-style estimate from confidences.")
    estimate_method: str | None = None
    estimated_drop: float | None = Field(default=None, description="Build-time minus estimated accuracy.")
    estimated_drop_low: float | None = Field(default=None, description="Lower bound of the estimated drop.")
    estimated_drop_high: float | None = Field(default=None, description="Upper bound of the estimated drop.")
    interval: str | None = Field(default=None, description="How the intervals were made, e.g. 'newcombe-wilson(95%)'.")
    degraded: bool = Field(
        description="Realized quality dropped past the threshold (classifiers: the drop's whole interval)."
    )
    reason: str = Field(description="Why degraded is what it is.")


def drop_interval(ref: float, ref_rows: float | None, acc: float, rows: int, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``ref - acc`` (the build-time accuracy exact when ``ref_rows`` is
    None: then the window's Wilson interval alone)."""
    if ref_rows:
        lo, hi = newcombe_interval(
            np.array(ref * ref_rows), np.array(ref_rows), np.array(acc * rows), np.array(rows), z
        )
        return float(lo), float(hi)
    acc_lo, acc_hi = wilson_interval(np.array(acc * rows), np.array(rows), z)
    return ref - float(acc_hi), ref - float(acc_lo)


def calibrated(calibration: Calibration, confidence: np.ndarray) -> np.ndarray:
    """Per-row probability of being correct, read from the reference calibration bins."""
    index = np.searchsorted(np.asarray(calibration.edges), confidence, side="right")
    return np.asarray(calibration.accuracy)[index]


_PRIOR_ROWS = 1.0  # at least one pseudo-row per bin, so that a bin the reference never visited is not exact


def estimate_interval(calibration: Calibration, confidence: np.ndarray, z: float) -> tuple[float, float, float]:
    """The estimate and its interval: Wilson over the window's rows, widened by the calibration's error."""
    index = np.searchsorted(np.asarray(calibration.edges), confidence, side="right")
    acc = np.asarray(calibration.accuracy)
    est = float(np.mean(acc[index]))
    n = confidence.size
    lo_a, hi_a = wilson_interval(np.array(est * n), np.array(n), z)
    lo, hi = float(lo_a), float(hi_a)
    share = np.bincount(index, minlength=len(acc)) / n
    # Each bin's accuracy is a proportion over its reference rows (plus the prior's pseudo-rows).
    rows = np.asarray(calibration.counts, dtype=np.float64) + _PRIOR_ROWS
    se_cal = float(np.sqrt(np.sum(share**2 * acc * (1 - acc) / rows)))
    return est, est - float(np.hypot(est - lo, z * se_cal)), est + float(np.hypot(hi - est, z * se_cal))


class QualityMonitor:
    def __init__(self, profile: Profile, config: QualityConfig | None = None) -> None:
        self.profile = profile
        self.config = config or QualityConfig()
        self.task = profile.prediction.task if profile.prediction else "classification"

    def query(self, now: float) -> dict[str, float | int | None]:
        """Keyword arguments for ``Store.labeled`` that select this monitor's window."""
        if self.config.window == "time":
            return {"since_ts": now - self.config.window_s, "limit": None}
        return {"since_ts": None, "limit": self.config.window_rows}

    def _window_text(self) -> str:
        c = self.config
        return f"last {c.window_rows} rows" if c.window == "count" else f"last {c.window_s:g} s"

    def evaluate(self, recent: Sequence[LabeledRow], labeled: Sequence[LabeledRow]) -> QualityReport:
        """``recent``: the window's predictions (for the estimate); ``labeled``: its labeled rows."""
        c = self.config
        ref = {k: v for k, v in self.profile.metrics.items() if k != "labeled_rows"}
        rows = [r for r in labeled if r.label is not None and r.prediction is not None]
        pred = np.array([r.prediction for r in rows], dtype=np.float64)
        truth = np.array([r.label for r in rows], dtype=np.float64)
        realized: dict[str, float] = {}
        drop = drop_lo = drop_hi = None
        degraded = False
        z = NormalDist().inv_cdf(0.5 + c.confidence / 2)
        level = f"{c.confidence:.0%}"
        if self.task == "classification":
            if len(rows):
                realized = {"accuracy": float(np.mean(pred == truth)), "f1_macro": f1_macro(pred, truth)}
            if "accuracy" in ref and "accuracy" in realized:
                drop = ref["accuracy"] - realized["accuracy"]
                ref_rows = self.profile.metrics.get("labeled_rows")
                drop_lo, drop_hi = drop_interval(ref["accuracy"], ref_rows, realized["accuracy"], len(rows), z)
        elif len(rows):
            realized = {"mae": float(np.mean(np.abs(pred - truth)))}
        if len(rows) < c.min_labeled:
            reason = f"{len(rows)} labeled rows in the window; {c.min_labeled} needed for a verdict"
        elif self.task == "classification" and drop is not None and drop_lo is not None and drop_hi is not None:
            degraded = drop_lo > c.max_accuracy_drop
            verdict = (
                "all of it above the limit"
                if degraded
                else "containing the limit: not enough evidence"
                if drop_hi >= c.max_accuracy_drop
                else "below the limit"
            )
            reason = (
                f"accuracy {realized['accuracy']:.3f} on {len(rows)} labels vs {ref['accuracy']:.3f} at build time: "
                f"drop {drop:.3f}, {level} interval {drop_lo:.3f} to {drop_hi:.3f}, {verdict} "
                f"({c.max_accuracy_drop:g})"
            )
        elif self.task == "regression" and "mae" in ref:
            limit = ref["mae"] * (1 + c.max_mae_increase)
            degraded = realized["mae"] > limit
            reason = f"MAE {realized['mae']:.4g} vs {ref['mae']:.4g} at build time (limit {limit:.4g})"
        else:
            reason = "no build-time metric in the profile to compare with"
        est = method = est_drop = est_lo = est_hi = None
        cal = self.profile.calibration
        conf = np.array([r.confidence for r in recent if r.confidence is not None], dtype=np.float64)
        if cal is not None and conf.size:
            est, low, high = estimate_interval(cal, conf, z)
            method = f"cbpe({cal.method}, {len(cal.accuracy)} bins, {conf.size} predictions)"
            if "accuracy" in ref:
                est_drop, est_lo, est_hi = ref["accuracy"] - est, ref["accuracy"] - high, ref["accuracy"] - low
        return QualityReport(
            task=self.task,
            window=self._window_text(),
            predictions=len(recent),
            labeled=len(rows),
            realized=realized,
            reference=ref,
            accuracy_drop=drop,
            accuracy_drop_low=drop_lo,
            accuracy_drop_high=drop_hi,
            estimated_accuracy=est,
            estimate_method=method,
            estimated_drop=est_drop,
            estimated_drop_low=est_lo,
            estimated_drop_high=est_hi,
            interval=f"newcombe-wilson({level})" if drop_lo is not None or est_lo is not None else None,
            degraded=degraded,
            reason=reason,
        )
