"""Boundary probing: many requests from one key that sit unusually close to the model's decision boundary.

A classifier's *margin* on a row is the gap between its two highest class probabilities. The profile records
how the reference's margins are distributed (:class:`MarginReference`: low quantiles, and how many reference
rows lie strictly below each). At request time the extraction watch (:mod:`.threats`) counts, per key and in
time buckets (:class:`ProbeCounts`), the key's recent rows and those whose margin is below the reference's
``probing_quantile``. :class:`ProbingTest` then asks whether a key's count is beyond what the reference
implies: an exact one-sided binomial test against the reference's share (its upper confidence bound, so that
a small reference does not make normal traffic look unusual) or, when larger, the other keys' share now (a
shift that confuses the model for every caller is drift, for the drift rules, not one key probing), at a
family-wise level over every key judged in that evaluation (Bonferroni), from a minimum number of requests,
and only when the share itself is large (``probing_min_share``). A client bisecting between two inputs of
different classes (the first step of a decision-based attack, or of stealing the boundary) sits there request
after request; normal traffic rarely.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from slipstream.frozen import Frozen

if TYPE_CHECKING:
    from slipstream.monitor.profile import Profile

MARGIN_LEVELS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5)
NULL_CONFIDENCE = 0.999  # the reference's share below the threshold is taken at this one-sided upper bound
BUCKETS_PER_WINDOW = 30  # a key's counts are kept in this many time buckets per probing window


class MarginReference(Frozen):
    """The reference's top-2 probability margins: the value at each low level, and the exact count below it."""

    levels: list[float] = Field(description="Quantile levels (MARGIN_LEVELS).")
    values: list[float] = Field(description="The reference's margin at each level.")
    below: list[int] = Field(description="Reference rows whose margin is strictly below each value.")
    rows: int = Field(ge=1, description="Reference rows the margins come from.")


def top2_margin(kind: str, output: np.ndarray) -> np.ndarray | None:
    """Per row, the highest class probability minus the second highest (softmax first for logits); None when
    the output holds no class scores (labels, values, one column)."""
    a = np.asarray(output)
    if kind not in ("probabilities", "logits") or a.ndim != 2 or a.shape[1] < 2 or a.dtype.kind != "f":
        return None
    p = a.astype(np.float64)
    if kind == "logits":
        p = np.exp(p - p.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
    top = np.partition(p, -2, axis=1)[:, -2:]
    return np.asarray(top[:, 1] - top[:, 0])


def margin_reference(kind: str, output: np.ndarray) -> MarginReference | None:
    """The margins of a classifier's reference outputs (None when the output holds no class scores)."""
    m = top2_margin(kind, output)
    if m is None or m.size == 0 or not np.all(np.isfinite(m)):
        return None
    values = np.quantile(m, MARGIN_LEVELS)
    below = np.searchsorted(np.sort(m), values, side="left")  # strictly below each value
    return MarginReference(
        levels=list(MARGIN_LEVELS), values=values.tolist(), below=below.astype(int).tolist(), rows=int(m.size)
    )


def binomial_sf(k: np.ndarray, n: np.ndarray, p: float | np.ndarray) -> np.ndarray:
    """P(X >= k) for X ~ Binomial(n, p), exactly (the regularized incomplete beta I_p(k, n - k + 1))."""
    from scipy.special import betainc  # scipy.special only: scipy.stats would cost a second of import

    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe = np.clip(k, 1.0, np.maximum(n, 1.0))
    return np.where(k <= 0, 1.0, np.where(k > n, 0.0, betainc(safe, n - safe + 1.0, p)))


def upper_share(below: int, rows: int, confidence: float = NULL_CONFIDENCE) -> float:
    """The exact (Clopper-Pearson) one-sided upper confidence bound of ``below / rows``."""
    return float(upper_shares(np.array([below]), np.array([rows]), confidence)[0])


def upper_shares(below: np.ndarray, rows: np.ndarray, confidence: float = NULL_CONFIDENCE) -> np.ndarray:
    """:func:`upper_share` of many counts at once (1 where every row, or no row, is counted)."""
    from scipy.special import betaincinv

    k, n = np.asarray(below, dtype=np.float64), np.asarray(rows, dtype=np.float64)
    ok = (n > 0) & (k < n)
    bound = betaincinv(np.where(ok, k + 1.0, 1.0), np.where(ok, n - k, 1.0), confidence)
    return np.asarray(np.where(ok, bound, 1.0))


@dataclass(frozen=True)
class ProbingVerdict:
    suspicious: bool
    p_value: float
    reason: str


@dataclass(frozen=True)
class ProbingTest:
    """When a key's rows near the boundary are too many for normal traffic (see the module docstring)."""

    threshold: float  # a row is near the boundary when its margin is strictly below this
    level: float  # the reference quantile level the threshold is
    null_share: float  # the share of normal rows below the threshold, at its upper confidence bound
    window_s: float
    min_requests: int
    min_share: float
    alpha: float

    @classmethod
    def from_reference(
        cls,
        ref: MarginReference,
        *,
        quantile: float,
        window_s: float,
        min_requests: int,
        min_share: float,
        alpha: float,
    ) -> ProbingTest:
        """At the stored level nearest ``quantile``."""
        i = int(np.argmin(np.abs(np.log(np.asarray(ref.levels)) - math.log(quantile))))
        return cls(
            threshold=ref.values[i],
            level=ref.levels[i],
            null_share=upper_share(ref.below[i], ref.rows),
            window_s=window_s,
            min_requests=min_requests,
            min_share=min_share,
            alpha=alpha,
        )

    def judge(self, counts: list[tuple[int, int]]) -> list[ProbingVerdict]:
        """A verdict per key from its ``(rows, rows near the boundary)`` in the window.

        Each key is tested against the larger of the reference's share and the other keys' share now (its
        upper bound, once they have ``min_requests`` rows): a shift that confuses the model for every caller
        is drift, not one key probing. The level is shared by the keys with at least ``min_requests`` rows
        (Bonferroni); the others are not judged."""
        if not counts:
            return []
        n = np.array([c[0] for c in counts], dtype=np.int64)
        low = np.array([c[1] for c in counts], dtype=np.int64)
        judged = n >= self.min_requests
        level = self.alpha / max(int(judged.sum()), 1)
        others_n, others_low = int(n.sum()) - n, int(low.sum()) - low
        compared = others_n >= self.min_requests
        others = np.where(compared, upper_shares(others_low, others_n), 0.0)
        p = binomial_sf(low, n, np.maximum(self.null_share, others))
        out = []
        columns = (n, low, p, judged, others, compared)
        per_key = zip(*(c.tolist() for c in columns), strict=True)
        for ni, li, pi, ji, oi, ci in per_key:
            share = li / ni if ni else 0.0
            now = f"other keys now: at most {oi:.1%}" if ci else "too few rows from other keys to compare"
            near = (
                f"{li} of {ni} rows within margin {self.threshold:.3g} of the decision boundary "
                f"(the reference's {self.level:.1%} quantile; normal: at most {self.null_share:.1%}; {now})"
            )
            if not ji:
                out.append(ProbingVerdict(False, 1.0, f"{ni} rows: under {self.min_requests}, not judged"))
            elif pi < level and share >= self.min_share:
                out.append(ProbingVerdict(True, pi, f"{near}, p = {pi:.2g} < {level:.2g}"))
            else:
                out.append(ProbingVerdict(False, pi, f"normal: {near}, p = {pi:.2g}"))
        return out


class ProbeCounts:
    """One key's rows and rows near the boundary, in time buckets of ``width`` seconds (bounded memory: about
    BUCKETS_PER_WINDOW buckets a key). Not thread-safe: the extraction watch holds its lock."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()  # [bucket start, rows, rows near the boundary]

    def add(self, times: np.ndarray, near: np.ndarray, width: float) -> None:
        """Count rows at ``times`` (in arrival order), ``near`` marking those near the boundary."""
        first = math.floor(float(times[0]) / width) * width
        if math.floor(float(times[-1]) / width) * width == first:  # the usual batch: one bucket, no arrays
            self._add(first, len(times), int(np.count_nonzero(near)))
            return
        start = np.floor(np.asarray(times, dtype=np.float64) / width) * width
        keys, inverse = np.unique(start, return_inverse=True)
        rows = np.bincount(inverse, minlength=keys.size)
        lows = np.bincount(inverse, weights=np.asarray(near, dtype=np.float64), minlength=keys.size)
        for b, r, lo in zip(keys.tolist(), rows.tolist(), lows.tolist(), strict=True):
            self._add(b, int(r), int(lo))

    def _add(self, start: float, rows: int, near: int) -> None:
        if self._buckets and start <= self._buckets[-1][0]:  # same bucket (or a late row: counted in the last)
            last = self._buckets[-1]
            last[1] += rows
            last[2] += near
        else:
            self._buckets.append([start, float(rows), float(near)])

    def totals(self, cutoff: float, width: float) -> tuple[int, int]:
        """Rows and rows near the boundary in buckets that end after ``cutoff`` (older ones are dropped)."""
        while self._buckets and self._buckets[0][0] + width <= cutoff:
            self._buckets.popleft()
        return int(sum(b[1] for b in self._buckets)), int(sum(b[2] for b in self._buckets))


def probing_test(
    profile: Profile | None, *, quantile: float, window_s: float, min_requests: int, min_share: float, alpha: float
) -> tuple[ProbingTest | None, str | None]:
    """The probing test a profile allows, or None and why not (for the log and the monitor's status)."""
    if profile is None:
        return None, "boundary probing: off (no profile)"
    spec = profile.prediction
    if spec is None or spec.task != "classification" or spec.kind not in ("probabilities", "logits"):
        return None, "boundary probing: off (the model is not a classifier with class scores)"
    if profile.margin is None:
        return None, (
            "boundary probing: off (the profile has no margin reference: it predates profile schema 4; "
            "rebuild the profile to get the signal)"
        )
    test = ProbingTest.from_reference(
        profile.margin,
        quantile=quantile,
        window_s=window_s,
        min_requests=min_requests,
        min_share=min_share,
        alpha=alpha,
    )
    return test, None
