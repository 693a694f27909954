"""Model quality in production: realized accuracy from delayed labels, and a label-free estimate.

Realized: accuracy and macro F1 (classifiers) or MAE (regressors) over the newest ``window_rows`` labeled
predictions, or those of the last ``window_s`` seconds, compared with the accuracy measured at build time
(the profile). Estimated (CBPE-style, classifiers only): each prediction's top-class confidence is mapped
through the calibration learnt on the reference (histogram binning of confidence against correctness), and
the mean calibrated confidence over recent predictions estimates accuracy before any label arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slipstream.evaluate.metrics import f1_macro
from slipstream.monitor.profile import Calibration, Profile
from slipstream.monitor.records import LabeledRow


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class QualityConfig(_Frozen):
    window: Literal["count", "time"] = Field(default="count", description="Window by row count or by age.")
    window_rows: int = Field(default=500, ge=1, description="Count window: the newest rows considered.")
    window_s: float = Field(default=3600.0, gt=0, description="Time window: rows of the last this many seconds.")
    min_labeled: int = Field(default=50, ge=1, description="Fewer labeled rows than this: no realized verdict.")
    max_accuracy_drop: float = Field(
        default=0.05, ge=0, description="Alert when build-time accuracy minus realized accuracy exceeds this."
    )
    max_mae_increase: float = Field(
        default=0.25, ge=0, description="Regressors: alert when realized MAE exceeds build-time MAE by this share."
    )


class QualityReport(_Frozen):
    task: Literal["classification", "regression"]
    window: str = Field(description="The window actually used, e.g. 'last 500 rows' or 'last 3600 s'.")
    predictions: int = Field(description="Predictions in the window (labeled or not).")
    labeled: int = Field(description="Labeled predictions in the window.")
    realized: dict[str, float] = Field(description="accuracy + f1_macro, or mae, on labeled rows.")
    reference: dict[str, float] = Field(description="The same metrics at build time (from the profile).")
    accuracy_drop: float | None = Field(default=None, description="Build-time minus realized accuracy.")
    estimated_accuracy: float | None = Field(default=None, description="CBPE-style estimate from confidences.")
    estimate_method: str | None = None
    estimated_drop: float | None = Field(default=None, description="Build-time minus estimated accuracy.")
    degraded: bool = Field(description="Realized quality dropped past the threshold.")
    reason: str = Field(description="Why degraded is what it is.")


def calibrated(calibration: Calibration, confidence: np.ndarray) -> np.ndarray:
    """Per-row probability of being correct, read from the reference calibration bins."""
    index = np.searchsorted(np.asarray(calibration.edges), confidence, side="right")
    return np.asarray(calibration.accuracy)[index]


def estimate_accuracy(calibration: Calibration, confidence: np.ndarray) -> float:
    return float(np.mean(calibrated(calibration, confidence))) if confidence.size else float("nan")


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
        drop = None
        degraded = False
        if self.task == "classification":
            if len(rows):
                realized = {"accuracy": float(np.mean(pred == truth)), "f1_macro": f1_macro(pred, truth)}
            if "accuracy" in ref and "accuracy" in realized:
                drop = ref["accuracy"] - realized["accuracy"]
        elif len(rows):
            realized = {"mae": float(np.mean(np.abs(pred - truth)))}
        if len(rows) < c.min_labeled:
            reason = f"{len(rows)} labeled rows in the window; {c.min_labeled} needed for a verdict"
        elif self.task == "classification" and drop is not None:
            degraded = drop > c.max_accuracy_drop
            reason = (
                f"accuracy {realized['accuracy']:.3f} vs {ref['accuracy']:.3f} at build time "
                f"(drop {drop:.3f}, limit {c.max_accuracy_drop:g})"
            )
        elif self.task == "regression" and "mae" in ref:
            limit = ref["mae"] * (1 + c.max_mae_increase)
            degraded = realized["mae"] > limit
            reason = f"MAE {realized['mae']:.4g} vs {ref['mae']:.4g} at build time (limit {limit:.4g})"
        else:
            reason = "no build-time metric in the profile to compare with"
        est = method = est_drop = None
        cal = self.profile.calibration
        conf = np.array([r.confidence for r in recent if r.confidence is not None], dtype=np.float64)
        if cal is not None and conf.size:
            est = estimate_accuracy(cal, conf)
            method = f"cbpe({cal.method}, {len(cal.accuracy)} bins, {conf.size} predictions)"
            est_drop = ref["accuracy"] - est if "accuracy" in ref else None
        return QualityReport(
            task=self.task,
            window=self._window_text(),
            predictions=len(recent),
            labeled=len(rows),
            realized=realized,
            reference=ref,
            accuracy_drop=drop,
            estimated_accuracy=est,
            estimate_method=method,
            estimated_drop=est_drop,
            degraded=degraded,
            reason=reason,
        )
