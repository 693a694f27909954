"""Bias across groups: per-group rates, the usual gap measures, and a confidence interval for every gap.

A request's group comes from a request parameter; "selected" means predicted as ``positive_label`` (for a
multi-class model, the class of interest). Definitions follow fairlearn's ``between_groups`` method:

* demographic parity difference = max − min selection rate over groups; ratio = min / max;
* equalized odds difference = the larger of (max − min TPR) and (max − min FPR), on labeled rows.

Why intervals: a point estimate of a gap is noisy. With groups assigned at random and a class of interest at
~10 %, min/max selection rates fall below 0.8 by chance in 38-46 % of windows of 500-2,000 rows, so a rule on
bare point estimates fires on noise. Here every pair of groups gets an interval for the difference of its
rates (Newcombe's hybrid score interval, built from the two Wilson intervals; method 10 of Newcombe 1998) and
for their ratio (MOVER-R of Donner & Zou from the same Wilson bounds, or Katz's log interval). The intervals
are simultaneous: Bonferroni over every pair and every rate compared in the window (selection rate for the
difference and the ratio, TPR and FPR for equalized odds), so noise alone puts some interval past its
threshold in at most ``1 - confidence`` of windows.

Each gap then has a status: ``"beyond threshold"`` when some pair's interval lies wholly past the threshold,
``"within"`` when every pair's interval lies on the good side, else ``"undecided"``, with an estimate of the
rows per group that would decide it (an interval's half-width shrinks as 1/sqrt(n)). The gap's value is
max − min (min / max) over the compared groups; the interval shown is that of the pair that decides: the one
lying furthest past the threshold, which is also what an interval alert rule compares. Groups with fewer than
``min_group_rows`` rows are reported but not compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import Field

from slipstream.frozen import Frozen
from slipstream.monitor.intervals import newcombe_interval, ratio_interval

GapName = Literal["demographic_parity_difference", "demographic_parity_ratio", "equalized_odds_difference"]
GapStatus = Literal["beyond threshold", "within", "undecided"]
RateName = Literal["selection rate", "true-positive rate", "false-positive rate"]

# An estimate past this is no plan for anyone; the text says "more than" instead.
MAX_NEEDED_ROWS = 1_000_000


class FairnessConfig(Frozen):
    positive_label: float = Field(default=1.0, description="The prediction (and label) that counts as selected.")
    max_difference: float = Field(default=0.1, ge=0, description="Flag a parity or odds difference above this.")
    min_ratio: float = Field(default=0.8, ge=0, le=1, description="Flag a demographic parity ratio below this.")
    min_group_rows: int = Field(default=30, ge=1, description="Groups smaller than this are not compared.")
    confidence: float = Field(
        default=0.99,
        gt=0.5,
        lt=1,
        description="Family confidence of the intervals over every pair and rate judged in one window: noise "
        "alone flags some gap in at most 1 - confidence of windows.",
    )
    correction: Literal["bonferroni", "none"] = Field(
        default="bonferroni",
        description="'bonferroni': split 1 - confidence over every comparison in the window; 'none': each "
        "interval on its own at `confidence` (more false flags with many groups).",
    )
    ratio_method: Literal["mover-r", "katz-log"] = Field(
        default="mover-r",
        description="Interval for a ratio of two rates: MOVER-R from the Wilson bounds (Donner & Zou), or "
        "Katz's log interval (0.5 added to every cell when a count is zero). Differences always use "
        "Newcombe's hybrid score interval.",
    )


class GroupMetrics(Frozen):
    group: str
    rows: int
    labeled: int
    selection_rate: float
    accuracy: float | None = Field(default=None, description="On labeled rows; None without labels.")
    tpr: float | None = Field(default=None, description="P(selected | label positive); None without positives.")
    fpr: float | None = Field(default=None, description="P(selected | label negative); None without negatives.")


class FairnessGap(Frozen):
    metric: GapName = Field(description="Which gap.")
    value: float | None = Field(description="max − min (ratio: min / max) over compared groups; None: too few.")
    low: float | None = Field(description="Lower bound of the deciding pair's simultaneous interval.")
    high: float | None = Field(description="Upper bound; None when unbounded (no group selected at all) or unjudged.")
    threshold: float = Field(description="The threshold the interval is judged against.")
    direction: Literal["above", "below"] = Field(description="The gap is bad above (differences) / below (ratio) it.")
    status: GapStatus = Field(description="Interval wholly past the threshold, wholly on the good side, or neither.")
    needed_rows: int | None = Field(
        description="Undecided: rows per group (labeled rows for equalized odds) likely to decide it, capped."
    )
    pair: list[str] = Field(description="The two groups whose interval is shown (the pair that decides).")
    rate: RateName = Field(description="The rate the shown interval compares.")
    reason: str = Field(description="The verdict in words, with the interval.")


class FairnessReport(Frozen):
    positive_label: float
    groups: list[GroupMetrics]
    compared: list[str] = Field(description="Groups large enough to enter the differences.")
    demographic_parity_difference: float | None
    demographic_parity_ratio: float | None
    equalized_odds_difference: float | None
    gaps: list[FairnessGap] = Field(default_factory=list, description="Every gap that could be looked at.")
    confidence: float = Field(default=0.99, description="Family confidence of the intervals.")
    comparisons: int = Field(default=0, description="Pairwise comparisons the confidence is split over.")
    flagged: bool = Field(description="Some gap's interval lies wholly beyond its threshold.")
    reasons: list[str] = Field(description="Every gap beyond its threshold or undecided, in words, with its interval.")

    def gap(self, metric: GapName) -> FairnessGap | None:
        return next((g for g in self.gaps if g.metric == metric), None)


# ---- judging one gap over every pair of compared groups ----


@dataclass(frozen=True)
class _Rates:
    """Counts per compared group for one rate: x of n selected; ``scale`` turns n into rows per group."""

    rate: RateName
    groups: list[str]
    x: np.ndarray
    n: np.ndarray
    scale: float = 1.0

    @property
    def pairs(self) -> int:
        return len(self.groups) * (len(self.groups) - 1) // 2


@dataclass(frozen=True)
class _Pair:
    groups: list[str]
    rate: RateName
    low: float
    high: float | None
    margin: float  # > 0: the interval lies past the threshold by this much
    status: GapStatus
    needed: float | None  # rows per group, when undecided
    spread: float  # the higher rate minus the lower
    extreme: bool  # the pair of the highest and the lowest rate: the one the gap's value comes from


def _factor(width: float, distance: float) -> float:
    """How many times the rows must grow for a half-width ``width`` to shrink below ``distance``."""
    return math.inf if distance <= 0 else max((width / distance) ** 2, 1.0)


def _pairs(r: _Rates, ratio: bool, t: float, z: float, method: Literal["mover-r", "katz-log"]) -> list[_Pair]:
    out: list[_Pair] = []
    p = r.x / r.n
    order = np.argsort(p, kind="stable")
    top, bottom = int(order[-1]), int(order[0])  # distinct even when rates tie
    for i, j in combinations(range(len(r.groups)), 2):
        hi, lo = (i, j) if p[i] >= p[j] else (j, i)
        hm = 2 / (1 / r.n[i] + 1 / r.n[j]) * r.scale  # a balanced design with this many per group is as precise
        if ratio:
            lows, highs = ratio_interval(r.x[lo], r.n[lo], r.x[hi], r.n[hi], z, method)
            point = float(p[lo] / p[hi]) if p[hi] > 0 else 1.0
            low, high = float(lows), float(highs)
            upper_t = math.inf if t <= 0 else 1 / t  # min/max ≥ t also means the inverse ratio ≤ 1/t
            margin = t - high
            beyond, within = high < t, low > t and high < upper_t
            if not math.isfinite(high):
                factor = math.inf
            elif point < t:
                factor = _factor(high - point, t - point)
            else:
                factor = max(
                    _factor(point - low, point - t) if low <= t else 1.0,
                    _factor(high - point, upper_t - point) if high >= upper_t else 1.0,
                )
        else:
            lows, highs = newcombe_interval(r.x[hi], r.n[hi], r.x[lo], r.n[lo], z)
            point, low, high = float(p[hi] - p[lo]), float(lows), float(highs)
            margin = low - t
            beyond, within = low > t, high < t and low > -t
            if point > t:
                factor = _factor(point - low, point - t)
            else:
                factor = max(
                    _factor(high - point, t - point) if high >= t else 1.0,
                    _factor(point - low, point + t) if low <= -t else 1.0,
                )
        status: GapStatus = "beyond threshold" if beyond else "within" if within else "undecided"
        needed = None if status != "undecided" or not math.isfinite(high) else factor * hm
        out.append(
            _Pair(
                [r.groups[lo], r.groups[hi]] if ratio else [r.groups[hi], r.groups[lo]],
                r.rate,
                low,
                high if math.isfinite(high) else None,
                margin,
                status,
                needed,
                float(p[hi] - p[lo]),
                {i, j} == {top, bottom},
            )
        )
    return out


def _planned_rows(rates: list[_Rates], ratio: bool, t: float, z: float) -> float:
    """Rows per group for which, with no gap at the pooled rate, the interval would lie within ``t``
    (normal approximation: of the difference, or of the log ratio; the rate taken as (x + 2) / (n + 4), so that
    none or all selected still gives an estimate)."""
    out = 0.0
    for r in rates:
        p = float((r.x.sum() + 2) / (r.n.sum() + 4))
        if ratio:
            n = 2 * z * z * (1 - p) / p / math.log(t) ** 2 if 0 < t < 1 else math.inf
        else:
            n = 2 * z * z * p * (1 - p) / t**2 if t > 0 else math.inf
        out = max(out, n * r.scale)
    return out


def _round_up(n: float) -> int:
    """Two significant digits, rounded up: an estimate, not a promise."""
    if n <= 100:
        return math.ceil(n)
    step = 10 ** (int(math.log10(n)) - 1)
    return int(math.ceil(n / step) * step)


_LABELS: dict[GapName, str] = {
    "demographic_parity_difference": "demographic parity difference",
    "demographic_parity_ratio": "demographic parity ratio",
    "equalized_odds_difference": "equalized odds difference",
}


def _need_text(needed: int | None, labeled: bool) -> str:
    unit = "labeled rows per group" if labeled else "per group"
    if needed is None:
        return "not enough rows to judge (no group has a selected row yet)"
    if needed >= MAX_NEEDED_ROWS:
        return f"not enough rows to judge (need more than {MAX_NEEDED_ROWS:,} {unit}: the gap sits at the threshold)"
    return f"not enough rows to judge (need ≈ {needed:,} {unit})"


def _judge(
    metric: GapName,
    value: float | None,
    rates: list[_Rates],
    t: float,
    z: float,
    c: FairnessConfig,
    floor_failed: str | None,
) -> FairnessGap:
    ratio = metric == "demographic_parity_ratio"
    pairs = [p for r in rates for p in _pairs(r, ratio, t, z, c.ratio_method)]
    label, labeled = _LABELS[metric], metric == "equalized_odds_difference"
    direction: Literal["above", "below"] = "below" if ratio else "above"
    if floor_failed:
        top = max(pairs, key=lambda p: p.spread)
        planned = _planned_rows(rates, ratio, t, z)
        at_least = _round_up(min(max(planned, c.min_group_rows), MAX_NEEDED_ROWS))
        reason = f"{label}: fewer than two groups have {c.min_group_rows} rows ({floor_failed}): " + _need_text(
            at_least, labeled
        )
        return FairnessGap(
            metric=metric, value=None, low=None, high=None, threshold=t, direction=direction, status="undecided",
            needed_rows=at_least, pair=top.groups, rate=top.rate, reason=reason,
        )  # fmt: skip
    # Shown: the pair furthest past the threshold when one is past it (what an interval alert compares),
    # else the pair of the highest and lowest rate, whose interval holds the gap's value.
    if any(p.status == "beyond threshold" for p in pairs):
        status: GapStatus = "beyond threshold"
        top = max(pairs, key=lambda p: p.margin)
    elif all(p.status == "within" for p in pairs):
        status = "within"
    else:
        status = "undecided"
    if status != "beyond threshold":
        top = max((p for p in pairs if p.extreme), key=lambda p: p.spread)
    needed_rows: int | None = None
    if status == "undecided":
        est = [p.needed for p in pairs if p.status == "undecided"]
        known = [e for e in est if e is not None]
        needed_rows = _round_up(min(max(known), MAX_NEEDED_ROWS)) if len(known) == len(est) else None
    sign = "<" if ratio else ">"
    level = f"{c.confidence * 100:g}"
    high = "∞" if top.high is None else f"{top.high:.3f}"
    interval = (
        f"{'simultaneous ' if c.correction == 'bonferroni' else ''}{level} % interval {top.low:.3f} to {high}"
        f" ({top.rate}, groups {top.groups[0]} vs {top.groups[1]})"
    )
    shown = "–" if value is None else f"{value:.3f}"
    if status == "beyond threshold":
        reason = f"{label} {shown} {sign} {t:g}: {interval}"
    elif status == "within":
        reason = f"{label} {shown} within {t:g}: {interval}"
    else:
        reason = f"{label} {shown} undecided against {t:g}: {interval}; {_need_text(needed_rows, labeled)}"
    return FairnessGap(
        metric=metric, value=value, low=top.low, high=top.high, threshold=t, direction=direction, status=status,
        needed_rows=needed_rows, pair=top.groups, rate=top.rate, reason=reason,
    )  # fmt: skip


def _spread(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) - min(present) if len(present) >= 2 else None


def _counts(
    rate: RateName, names: list[str], masks: dict[str, np.ndarray], base: np.ndarray, selected: np.ndarray
) -> _Rates:
    n = np.array([int((masks[g] & base).sum()) for g in names], dtype=np.float64)
    x = np.array([int((masks[g] & base & selected).sum()) for g in names], dtype=np.float64)
    keep = n > 0
    return _Rates(rate, [g for g, k in zip(names, keep, strict=True) if k], x[keep], n[keep])


def _odds_rates(
    names: list[str], masks: dict[str, np.ndarray], positive: np.ndarray, negative: np.ndarray, selected: np.ndarray
) -> list[_Rates]:
    """TPR and FPR counts of the groups that have such rows; ``scale`` turns positives (negatives) per group
    into labeled rows per group, at the pooled share of positives (negatives)."""
    everyone = np.zeros_like(positive)
    for name in names:
        everyone |= masks[name]
    labeled = max(int((everyone & (positive | negative)).sum()), 1)
    out = []
    for rate, base in (("true-positive rate", positive), ("false-positive rate", negative)):
        r = _counts(rate, names, masks, base, selected)  # type: ignore[arg-type]  # the literal pairs above
        share = max(int((everyone & base).sum()) / labeled, 1e-9)
        if r.pairs:
            out.append(_Rates(r.rate, r.groups, r.x, r.n, 1 / share))
    return out


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
    names = sorted(set(g[has_group].tolist()))
    masks = {name: has_group & (g == name) for name in names}
    out: list[GroupMetrics] = []
    for name in names:
        m, lab = masks[name], masks[name] & labeled
        npos, nneg = int((m & positive).sum()), int((m & negative).sum())
        out.append(
            GroupMetrics(
                group=name,
                rows=int(m.sum()),
                labeled=int(lab.sum()),
                selection_rate=float(selected[m].mean()),
                accuracy=float(np.mean(pred[lab] == y[lab])) if lab.any() else None,
                tpr=float(selected[m & positive].mean()) if npos else None,
                fpr=float(selected[m & negative].mean()) if nneg else None,
            )
        )
    big = [m for m in out if m.rows >= c.min_group_rows]
    big_names = [m.group for m in big]
    rates = [m.selection_rate for m in big]
    dpd = _spread(rates)
    dpr = None
    if len(rates) >= 2:
        dpr = min(rates) / max(rates) if max(rates) > 0 else 1.0
    tpr_gap, fpr_gap = _spread([m.tpr for m in big]), _spread([m.fpr for m in big])
    present = [v for v in (tpr_gap, fpr_gap) if v is not None]
    eod = max(present) if present else None

    # What is compared: all groups when fewer than two pass the floor (then only to say how many rows it needs).
    dp_floor = len(big) < 2
    everyone = np.ones_like(has_group)
    dp_rates = _counts("selection rate", names if dp_floor else big_names, masks, everyone, selected)
    eo_big = _odds_rates(big_names, masks, positive, negative, selected)
    eo_floor = not eo_big
    eo_rates = _odds_rates(names, masks, positive, negative, selected) if eo_floor else eo_big
    # Every comparison the window makes shares the error budget (also when only estimating rows needed).
    judged = 2 * dp_rates.pairs + sum(r.pairs for r in eo_rates)
    k = max(judged, 1) if c.correction == "bonferroni" else 1
    z = NormalDist().inv_cdf(1 - (1 - c.confidence) / (2 * k))
    small = ", ".join(f"{x.group} ({x.rows} rows)" for x in out)
    dp_small, eo_small = (small if dp_floor else None), (small if eo_floor else None)
    gaps: list[FairnessGap] = []
    if dp_rates.pairs:
        gaps.append(_judge("demographic_parity_difference", dpd, [dp_rates], c.max_difference, z, c, dp_small))
        gaps.append(_judge("demographic_parity_ratio", dpr, [dp_rates], c.min_ratio, z, c, dp_small))
    if eo_rates:
        gaps.append(_judge("equalized_odds_difference", eod, eo_rates, c.max_difference, z, c, eo_small))
    return FairnessReport(
        positive_label=c.positive_label,
        groups=out,
        compared=big_names,
        demographic_parity_difference=dpd,
        demographic_parity_ratio=dpr,
        equalized_odds_difference=eod,
        gaps=gaps,
        confidence=c.confidence,
        comparisons=judged,
        flagged=any(x.status == "beyond threshold" for x in gaps),
        reasons=[x.reason for x in gaps if x.status != "within"],
    )


GAP_NAMES: tuple[GapName, ...] = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
)


def fairness_metrics(report: FairnessReport | None) -> dict[str, float | None]:
    """The monitor's metrics for every gap: ``fairness.<gap>`` (the value) and ``fairness.<gap>.low`` /
    ``.high`` (the interval an interval alert rule compares). None where there is nothing to judge."""
    out: dict[str, float | None] = {}
    for name in GAP_NAMES:
        gap = report.gap(name) if report is not None else None
        out[f"fairness.{name}"] = getattr(report, name) if report is not None else None
        out[f"fairness.{name}.low"] = gap.low if gap is not None else None
        out[f"fairness.{name}.high"] = gap.high if gap is not None else None
    return out
