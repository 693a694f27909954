"""Content drift: two-sample tests that see what per-channel pixel statistics cannot.

The profile keeps an image's per-channel mean and standard deviation, so a flip, a 90° rotation or a change
in the class mix leaves it unmoved (``benchmarks/drift_detection.py`` measured 0-25 % detection for those on
the demo's digits), and a text model's token ids are not features at all. Two detectors look at what the
model makes of its inputs instead:

* :class:`OutputShiftDetector`, black-box shift detection (BBSD): a two-sample Kolmogorov-Smirnov test on
  each column of the softmax output plus a chi² test on the predicted-class counts, Bonferroni-corrected
  over the ``k + 1`` tests. Rabanser, Günnemann & Lipton ("Failing Loudly", NeurIPS 2019) found it the
  strongest simple detector across image shifts, and it needs nothing but the outputs the server already
  returns.
* :class:`MMDDetector`, a kernel two-sample test (maximum mean discrepancy, RBF kernel, median-heuristic
  bandwidth) with a permutation p-value, on an embedding: the penultimate activations of a classifier, or
  the output of an embedding model.

Cost is what decides whether a monitor can run a permutation test at its evaluation cadence, so everything
that depends on the reference alone is computed once: the bandwidth, the reference kernel block, and for
each window size the permutation weights with the reference-reference share of every permuted statistic.
A window then costs two kernel blocks (window × reference, window × window) and two matrix products, all
permutations at once: the biased MMD² of a split with weights ``w`` (``+1/m`` window, ``-1/n`` reference)
is ``wᵀ K w``, so ``P`` permutations are the column sums of ``W ⊙ (K W)`` for a ``[n + m, P]`` matrix ``W``.

Windows too small to decide are reported as not judged, with the reason, rather than silently passed.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Literal

import numpy as np
from pydantic import Field

from slipstream.errors import InputError
from slipstream.frozen import Frozen
from slipstream.monitor._blas import ONE_BLAS_THREAD

__all__ = ["MMDDetector", "OutputShiftDetector", "ShiftResult", "chi2_sf", "kolmogorov_sf", "softmax"]

# Chi² is trusted only where the expected count of a cell is at least this; rarer classes are pooled.
_MIN_EXPECTED = 5.0
# Size-dependent permutation caches kept per detector (a growing window meets a few sizes).
_CACHED_SIZES = 4
# Multiply-adds below which a matrix product stays off BLAS's threads (unless BLAS runs one thread anyway).
_SMALL_PRODUCT = 8_000_000


class ShiftResult(Frozen):
    """The verdict of one content-drift test on one window."""

    test: Literal["output_ks", "mmd"] = Field(description="Which detector ran.")
    method: str = Field(description="What was computed, e.g. 'mmd(rbf, median bw=0.9, 200 perms)'.")
    rows: int = Field(description="Window rows given to the test.")
    used_rows: int = Field(default=0, description="Window rows the test used (after even subsampling).")
    reference_rows: int = Field(description="Reference rows the test compares against.")
    statistic: float = Field(description="The deciding statistic: KS D or chi² of the smallest p, or MMD².")
    p_value: float = Field(description="p-value, Bonferroni-corrected where several tests ran (1.0 if not judged).")
    alpha: float = Field(description="Drift when p_value < alpha.")
    drifted: bool = Field(description="p_value < alpha on a judged window.")
    judged: bool = Field(description="False when the window had too few rows to decide.")
    seconds: float = Field(description="Wall time of the test, in seconds.")
    reason: str = Field(default="", description="Which test decided, or why the window was not judged.")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[n, k]`` logits, in float64, stable for any magnitude."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise InputError(
            f"softmax needs logits shaped [rows, classes]; got shape {list(z.shape)}.",
            hint="Stack one row of logits per request.",
        )
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _matrix(x: np.ndarray, what: str, width: int | None, dtype: type[np.float32 | np.float64]) -> np.ndarray:
    """``x`` as a finite 2-D array of ``dtype``, or an InputError saying what was expected."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise InputError(
            f"The {what} must be 2-D [rows, features]; got shape {list(a.shape)}.",
            hint="Stack one row per request (flatten anything with more axes).",
        )
    if width is not None and a.shape[1] != width:
        raise InputError(
            f"The {what} has {a.shape[1]} columns; the reference has {width}.",
            hint="Compare outputs of the same model and layer the reference was taken from.",
        )
    a = a.astype(dtype, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise InputError(
            f"The {what} has {rows.size} row(s) with NaN or infinite values (first at row {int(rows[0])}).",
            hint="Drop those rows before testing; a model emitting NaN is a fault to fix, not drift to measure.",
        )
    return a


def _check_probabilities(p: np.ndarray, what: str) -> None:
    if p.size == 0:
        return
    sums = p.sum(axis=1)
    if p.min() < -1e-6 or p.max() > 1 + 1e-6 or np.abs(sums - 1).max() > 1e-3:
        raise InputError(
            f"The {what} are not probabilities (values in [{p.min():.3g}, {p.max():.3g}], "
            f"row sums {sums.min():.4g}..{sums.max():.4g}).",
            hint="Pass softmax(logits) (slipstream.monitor.shift.softmax) instead of raw logits.",
        )


def _not_judged(
    test: Literal["output_ks", "mmd"], method: str, rows: int, ref_rows: int, alpha: float, need: int, t0: float
) -> ShiftResult:
    return ShiftResult(
        test=test,
        method=method,
        rows=rows,
        used_rows=rows,
        reference_rows=ref_rows,
        statistic=0.0,
        p_value=1.0,
        alpha=alpha,
        drifted=False,
        judged=False,
        seconds=time.perf_counter() - t0,
        reason=f"not enough rows to judge (need ≥ {need}, got {rows})",
    )


def _ks_statistics(ref_sorted: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Two-sample KS D for every column: ``ref_sorted`` is ``[k, n]`` (each row sorted), window ``[m, k]``.

    Between two window points the window's CDF is flat and the reference's rises, so the largest gap is at a
    window point or just before one: D = max over window points of the gap there (right limits) and just
    before it (left limits). Two binary searches per column; ties on either side are exact.
    """
    n, m = ref_sorted.shape[1], window.shape[0]
    win = np.sort(np.ascontiguousarray(window.T), axis=1)  # [k, m]
    ref_right = np.stack([np.searchsorted(r, w, side="right") for r, w in zip(ref_sorted, win, strict=True)])
    ref_left = np.stack([np.searchsorted(r, w, side="left") for r, w in zip(ref_sorted, win, strict=True)])
    # The window's own CDF at and just before each of its points: the end and start of each run of ties.
    idx = np.broadcast_to(np.arange(m), win.shape)
    starts = np.ones(win.shape, dtype=bool)
    starts[:, 1:] = win[:, 1:] != win[:, :-1]
    ends = np.ones(win.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    win_left = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    win_right = np.minimum.accumulate(np.where(ends, idx + 1, m)[:, ::-1], axis=1)[:, ::-1]
    at = np.abs(ref_right / n - win_right / m)
    before = np.abs(ref_left / n - win_left / m)
    return np.asarray(np.maximum(at.max(axis=1), before.max(axis=1)))


class OutputShiftDetector:
    """Black-box shift detection on a classifier's softmax outputs (Rabanser et al. 2019).

    Build once from the probabilities the model gave on reference data; :meth:`test` per window.
    """

    def __init__(self, reference_probs: np.ndarray, *, alpha: float = 0.01, min_rows: int = 20) -> None:
        if not 0 < alpha < 1:
            raise InputError(f"alpha must lie in (0, 1); got {alpha}.", hint="Use e.g. 0.01.")
        p = _matrix(reference_probs, "reference probabilities", None, np.float64)
        if p.shape[1] < 2 or p.shape[0] < 2:
            raise InputError(
                f"The reference needs ≥ 2 rows and ≥ 2 classes; got shape {list(p.shape)}.",
                hint="Profile the model on a held-out set of at least a few hundred rows.",
            )
        _check_probabilities(p, "reference probabilities")
        self.alpha = alpha
        self.min_rows = max(int(min_rows), 1)
        self.classes = p.shape[1]
        self.reference_rows = p.shape[0]
        self._ref_sorted = np.ascontiguousarray(np.sort(p, axis=0).T)  # [k, n]
        self._ref_counts = np.bincount(p.argmax(axis=1), minlength=self.classes).astype(np.float64)
        self.method = f"ks({self.classes} softmax columns)+chi2(class)+bonferroni(alpha={alpha:g})"

    def test(self, window_probs: np.ndarray) -> ShiftResult:
        t0 = time.perf_counter()
        w = _matrix(window_probs, "window probabilities", self.classes, np.float64)
        rows = w.shape[0]
        if rows < self.min_rows:
            return _not_judged("output_ks", self.method, rows, self.reference_rows, self.alpha, self.min_rows, t0)
        _check_probabilities(w, "window probabilities")
        n = self.reference_rows
        d = _ks_statistics(self._ref_sorted, w)
        ks_p = kolmogorov_sf(d, n * rows / (n + rows))
        chi_stat, chi_p = self._chi2(np.bincount(w.argmax(axis=1), minlength=self.classes))
        stats = np.append(d, chi_stat)
        ps = np.append(np.asarray(ks_p, dtype=np.float64), chi_p)
        best = int(np.argmin(ps))
        p_adj = float(min(1.0, ps[best] * ps.size))
        reason = f"ks on softmax column {best}" if best < self.classes else "chi2 on predicted-class counts"
        return ShiftResult(
            test="output_ks",
            method=self.method,
            rows=rows,
            used_rows=rows,
            reference_rows=n,
            statistic=float(stats[best]),
            p_value=p_adj,
            alpha=self.alpha,
            drifted=p_adj < self.alpha,
            judged=True,
            seconds=time.perf_counter() - t0,
            reason=f"smallest p: {reason}",
        )

    def _chi2(self, window_counts: np.ndarray) -> tuple[float, float]:
        """Chi² homogeneity of reference vs window class counts; classes expected < 5 times are pooled."""
        ref, win = self._ref_counts, window_counts.astype(np.float64)
        total = ref + win
        share = total / total.sum()
        rare = share * min(ref.sum(), win.sum()) < _MIN_EXPECTED
        if rare.any():
            ref = np.append(ref[~rare], ref[rare].sum())
            win = np.append(win[~rare], win[rare].sum())
            keep = (ref + win) > 0
            ref, win = ref[keep], win[keep]
        if ref.size < 2:
            return 0.0, 1.0
        table = np.stack([ref, win])
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
        stat = float(((table - expected) ** 2 / expected).sum())
        return stat, chi2_sf(stat, ref.size - 1)


class _Permutations:
    """Everything about a permutation test that depends on the window size but not the window's values."""

    __slots__ = ("ref_term", "w_ref", "w_win")

    def __init__(self, k_ref: np.ndarray, m: int, permutations: int, seed: int) -> None:
        n = k_ref.shape[0]
        rng = np.random.default_rng([seed, m])
        # Column 0 is the observed split (window first); columns 1.. are random relabelings of the pool.
        labels = np.zeros((permutations + 1, n + m), dtype=bool)
        labels[0, n:] = True
        labels[1:, :m] = True
        labels[1:] = rng.permuted(labels[1:], axis=1)
        weights = np.where(labels, np.float32(1.0 / m), np.float32(-1.0 / n)).T  # [n + m, P + 1]
        self.w_ref = np.ascontiguousarray(weights[:n])
        self.w_win = np.ascontiguousarray(weights[n:])
        self.ref_term = np.einsum("ip,ip->p", self.w_ref, _product(k_ref, self.w_ref))


class MMDDetector:
    """Kernel two-sample test (MMD², RBF kernel, permutation p-value) between a window and a reference.

    The bandwidth is the median heuristic on the reference (``k(x, y) = exp(-‖x − y‖² / median‖·‖²)``),
    fixed at construction so every window is measured with the same kernel. Rows beyond
    ``max_reference_rows`` / ``max_window_rows`` are subsampled evenly. Arithmetic is float32.
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        alpha: float = 0.01,
        permutations: int = 200,
        max_reference_rows: int = 1000,
        max_window_rows: int = 1000,
        min_rows: int = 20,
        seed: int = 0,
    ) -> None:
        if not 0 < alpha < 1:
            raise InputError(f"alpha must lie in (0, 1); got {alpha}.", hint="Use e.g. 0.01.")
        if permutations < 1:
            raise InputError(f"permutations must be ≥ 1; got {permutations}.", hint="Use 100-500.")
        x = _matrix(reference, "reference", None, np.float32)
        if x.shape[0] < 2 or x.shape[1] < 1:
            raise InputError(
                f"The reference needs ≥ 2 rows and ≥ 1 feature; got shape {list(x.shape)}.",
                hint="Take the embedding on a held-out set of at least a few hundred rows.",
            )
        x = x[_even(x.shape[0], max_reference_rows)]
        self.alpha = alpha
        self.permutations = int(permutations)
        self.max_window_rows = max(int(max_window_rows), 1)
        self.min_rows = max(int(min_rows), 1)
        self.seed = seed
        self.features = x.shape[1]
        self.reference_rows = x.shape[0]
        self._ref = np.ascontiguousarray(x)
        self._ref_sq = np.einsum("ij,ij->i", x, x)
        d_ref = _sq_distances(x, self._ref_sq, x, self._ref_sq)
        off = d_ref[np.triu_indices(x.shape[0], k=1)]
        median = float(np.median(off))
        if median <= 0:
            positive = off[off > 0]
            median = float(positive.mean()) if positive.size else 1.0
        self.bandwidth = float(np.sqrt(median / 2))  # σ of exp(-‖·‖² / 2σ²)
        self._gamma = np.float32(1.0 / median)
        self._k_ref = np.exp(-self._gamma * d_ref)
        self._cache: OrderedDict[int, _Permutations] = OrderedDict()
        self.method = f"mmd(rbf, median bw σ={self.bandwidth:.3g}, {self.permutations} perms, alpha={alpha:g})"

    def _permutations(self, m: int) -> _Permutations:
        perms = self._cache.get(m)
        if perms is None:
            perms = _Permutations(self._k_ref, m, self.permutations, self.seed)
            self._cache[m] = perms
            if len(self._cache) > _CACHED_SIZES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(m)
        return perms

    def test(self, window: np.ndarray) -> ShiftResult:
        t0 = time.perf_counter()
        x = _matrix(window, "window", self.features, np.float32)
        rows = x.shape[0]
        if rows < self.min_rows:
            return _not_judged("mmd", self.method, rows, self.reference_rows, self.alpha, self.min_rows, t0)
        x = np.ascontiguousarray(x[_even(rows, self.max_window_rows)])
        m = x.shape[0]
        perms = self._permutations(m)
        sq = np.einsum("ij,ij->i", x, x)
        k_cross = _kernel(x, sq, self._ref, self._ref_sq, self._gamma)  # [m, n]
        k_win = _kernel(x, sq, x, sq, self._gamma)  # [m, m]
        # wᵀKw over the blocks: ref·ref (cached) + 2·ref·win + win·win, every permutation in one product.
        cross = np.einsum("ip,ip->p", perms.w_win, _product(k_cross, perms.w_ref))
        within = np.einsum("ip,ip->p", perms.w_win, _product(k_win, perms.w_win))
        mmd2 = perms.ref_term + 2 * cross + within
        observed = float(mmd2[0])
        # float32 rounding: a permutation equal to the observed split up to 1e-6 relative counts as ≥.
        tol = 1e-6 * max(abs(observed), float(np.abs(mmd2).max()), 1e-12)
        p = float((1 + np.count_nonzero(mmd2[1:] >= observed - tol)) / (1 + self.permutations))
        return ShiftResult(
            test="mmd",
            method=self.method,
            rows=rows,
            used_rows=m,
            reference_rows=self.reference_rows,
            statistic=observed,
            p_value=p,
            alpha=self.alpha,
            drifted=p < self.alpha,
            judged=True,
            seconds=time.perf_counter() - t0,
            reason="biased MMD² (V-statistic) vs its permutation distribution",
        )


def kolmogorov_sf(d: np.ndarray, effective_n: float) -> np.ndarray:
    """Asymptotic two-sample KS p-values for statistics ``d`` at ``effective_n = n·m / (n + m)``.

    The Kolmogorov series with Stephens' small-sample correction (accurate to ~1 % from n ≈ 5): numpy only,
    so the monitor does not pay scipy.stats' second of import for one formula.
    """
    sq = np.sqrt(effective_n)
    lam = np.maximum((sq + 0.12 + 0.11 / sq) * np.asarray(d, dtype=np.float64), 1e-12)
    k = np.arange(1, 101, dtype=np.float64)[:, None]
    terms = 2 * (-1.0) ** (k - 1) * np.exp(-2 * k**2 * lam[None, :] ** 2)
    # The series converges slowly for tiny λ, where the p-value is 1 anyway.
    return np.asarray(np.where(lam < 0.2, 1.0, np.clip(terms.sum(axis=0), 0.0, 1.0)))


def chi2_sf(x: float, dof: int) -> float:
    """Upper tail of the chi² distribution (the regularized upper incomplete gamma Q(dof/2, x/2))."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # series for the lower tail P(a, z)
        term = total = 1.0 / a
        ap = a
        for _ in range(500):
            ap += 1
            term *= z / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's continued fraction for Q(a, z)
    b = z + 1 - a
    c = 1.0 / 1e-300
    d = 1.0 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def _even(rows: int, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced row indices out of ``rows``."""
    if rows <= limit:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, limit).round().astype(np.int64))


def _product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b``; small products on this thread only when BLAS may use several (see ``monitor._blas``).

    On busy cores a threaded BLAS call under ~10 M multiply-adds cost 36 ms where einsum took 2.5 ms
    (60 × 300 @ 300 × 201, measured); above that BLAS wins even so.
    """
    if ONE_BLAS_THREAD or a.shape[0] * a.shape[1] * b.shape[1] >= _SMALL_PRODUCT:
        return np.asarray(a @ b)
    return np.asarray(np.einsum("ij,jk->ik", a, b))


def _sq_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]`` via one matrix product, clipped at 0."""
    d = _product(a, b.T)
    d *= -2
    d += a_sq[:, None]
    d += b_sq[None, :]
    np.maximum(d, 0, out=d)
    return d


def _kernel(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray, gamma: np.float32) -> np.ndarray:
    """RBF kernel block ``exp(-gamma · ‖a_i − b_j‖²)``, computed in place (no temporaries of its size)."""
    k = _sq_distances(a, a_sq, b, b_sq)
    k *= -gamma
    np.exp(k, out=k)
    return k
