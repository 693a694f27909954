"""Bias across groups: per-group selection rate, accuracy, TPR and FPR, and the usual gap measures.

A request's group comes from a request parameter; "selected" means predicted as ``positive_label`` (for a
multi-class model, the class of interest). Definitions follow fairlearn's ``between_groups`` method:

* demographic parity difference = max − min selection rate over groups; ratio = min / max;
* equalized odds difference = the larger of (max − min TPR) and (max − min FPR), on labeled rows.

Groups with fewer than ``min_group_rows`` rows are reported but left out of the gaps (too noisy to judge).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FairnessConfig(_Frozen):
    positive_label: float = Field(default=1.0, description="The prediction (and label) that counts as selected.")
    max_difference: float = Field(default=0.1, ge=0, description="Flag a parity or odds difference above this.")
    min_ratio: float = Field(default=0.8, ge=0, le=1, description="Flag a demographic parity ratio below this.")
    min_group_rows: int = Field(default=30, ge=1, description="Groups smaller than this are not compared.")


class GroupMetrics(_Frozen):
    group: str
    rows: int
    labeled: int
    selection_rate: float
    accuracy: float | None = Field(default=None, description="On labeled rows; None without labels.")
    tpr: float | None = Field(default=None, description="P(selected | label positive); None without positives.")
    fpr: float | None = Field(default=None, description="P(selected | label negative); None without negatives.")


class FairnessReport(_Frozen):
    positive_label: float
    groups: list[GroupMetrics]
    compared: list[str] = Field(description="Groups large enough to enter the differences.")
    demographic_parity_difference: float | None
    demographic_parity_ratio: float | None
    equalized_odds_difference: float | None
    flagged: bool
    reasons: list[str] = Field(description="Every threshold crossed, in words.")


def _rate(mask: np.ndarray, selected: np.ndarray) -> float | None:
    n = int(mask.sum())
    return float(selected[mask].mean()) if n else None


def _spread(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) - min(present) if len(present) >= 2 else None


def fairness_report(
    groups: Sequence[str | None],
    predictions: np.ndarray,
    labels: np.ndarray | None = None,
    config: FairnessConfig | None = None,
) -> FairnessReport:
    """Metrics per group from parallel arrays; ``labels`` may hold NaN where no label has come.
    Rows without a group are ignored."""
    c = config or FairnessConfig()
    g = np.array(["" if x is None else str(x) for x in groups], dtype=object)
    has_group = np.array([x is not None for x in groups], dtype=bool)
    pred = np.asarray(predictions, dtype=np.float64)
    y = np.full(pred.shape, np.nan) if labels is None else np.asarray(labels, dtype=np.float64)
    selected = pred == c.positive_label
    labeled = ~np.isnan(y)
    positive = labeled & (y == c.positive_label)
    negative = labeled & (y != c.positive_label)
    out: list[GroupMetrics] = []
    for name in sorted(set(g[has_group].tolist())):
        m = has_group & (g == name)
        lab = m & labeled
        out.append(
            GroupMetrics(
                group=name,
                rows=int(m.sum()),
                labeled=int(lab.sum()),
                selection_rate=float(selected[m].mean()),
                accuracy=float(np.mean(pred[lab] == y[lab])) if lab.any() else None,
                tpr=_rate(m & positive, selected),
                fpr=_rate(m & negative, selected),
            )
        )
    big = [m for m in out if m.rows >= c.min_group_rows]
    rates = [m.selection_rate for m in big]
    dpd = _spread(rates)
    dpr = None
    if len(rates) >= 2:
        dpr = min(rates) / max(rates) if max(rates) > 0 else 1.0
    tpr_gap, fpr_gap = _spread([m.tpr for m in big]), _spread([m.fpr for m in big])
    gaps = [v for v in (tpr_gap, fpr_gap) if v is not None]
    eod = max(gaps) if gaps else None
    reasons = []
    if dpd is not None and dpd > c.max_difference:
        reasons.append(f"demographic parity difference {dpd:.3f} > {c.max_difference:g}")
    if dpr is not None and dpr < c.min_ratio:
        reasons.append(f"demographic parity ratio {dpr:.3f} < {c.min_ratio:g}")
    if eod is not None and eod > c.max_difference:
        reasons.append(f"equalized odds difference {eod:.3f} > {c.max_difference:g}")
    return FairnessReport(
        positive_label=c.positive_label,
        groups=out,
        compared=[m.group for m in big],
        demographic_parity_difference=dpd,
        demographic_parity_ratio=dpr,
        equalized_odds_difference=eod,
        flagged=bool(reasons),
        reasons=reasons,
    )
