"""Vectorized binning of every column at once against per-column edges.

Edges are a ``[features, k]`` matrix, sorted along each row. A value ``x`` falls in bin ``i`` = the number of
edges ``<= x`` (so bins are ``[e_{i-1}, e_i)``; NaN counts as below every edge). Counting costs ``k``
comparison passes over the window and no per-column Python loop: the number of values at or above each edge
is one ``count_nonzero`` per edge, and bin counts are differences of those.

Tied deciles (a discrete or small-count column: at least 10 % of the reference on one value ``v``) would
leave ``v`` in one bin with everything above it: a column that is 0 in 95 % of the rows has all nine deciles at
0, and ``[0, inf)`` would hold every row, so no shift of its counts could show. :func:`decile_edges` therefore
nudges the last edge of each tied group just above ``v``: the group's bins become ``< v``, exactly ``v`` and
``> v`` (the other bins between equal edges stay empty for the reference and the window alike). Profiles
store the edges they were built with, so one built before this keeps its own, consistent, bins.

The statistics of a window's bin counts against the reference's fractions live here too, each vectorized
over features (rows): PSI, Jensen-Shannon distance, binned Wasserstein-1, and the chi² test of homogeneity
with sparse bins pooled (:func:`chi2_p`).
"""

from __future__ import annotations

import numpy as np

TIE_NUDGE = 1e-6  # relative: above float32's resolution (1.2e-7), far below any gap between discrete values


def decile_edges(reference: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``[features, len(levels)]`` edges at the given quantile levels, each tied group's last edge nudged just
    above the tied value (see the module docstring)."""
    edges = np.asarray(np.quantile(reference, levels, axis=0).T.copy(), dtype=np.float64)
    if edges.shape[1] < 2:
        return edges
    tied = edges[:, 1:] == edges[:, :-1]  # edge i+1 repeats edge i
    last = np.zeros_like(edges, dtype=bool)
    last[:, 1:] = tied
    last[:, 1:-1] &= ~tied[:, 1:]  # ...and edge i+2 does not: i+1 closes its group
    if not last.any():
        return edges
    value = edges[last]
    nudged = value + TIE_NUDGE * np.maximum(np.abs(value), 1.0)
    upper = np.full(edges.shape, np.inf)
    upper[:, :-1] = edges[:, 1:]  # never past the next (distinct) edge
    edges[last] = np.minimum(nudged, upper[last])
    return edges


def bin_counts(window: np.ndarray, edges: np.ndarray, *, chunk_rows: int = 256) -> np.ndarray:
    """``[features, k + 1]`` counts of ``window`` ``[rows, features]`` in the bins that ``edges`` make.

    ``edges`` are cast to the window's float dtype (float32 windows stay float32: half the memory traffic).
    The window is walked in row chunks that fit in cache, ``k`` comparisons per chunk.
    """
    rows = window.shape[0]
    k = edges.shape[1]
    dtype = window.dtype if window.dtype in (np.float32, np.float64) else np.float64
    data = window.astype(dtype, copy=False)
    cols = [np.ascontiguousarray(edges[:, i], dtype=dtype) for i in range(k)]
    at_or_above = np.zeros((k, edges.shape[0]), dtype=np.int64)
    for start in range(0, rows, chunk_rows):  # a loop over row chunks and edges, never over columns
        block = data[start : start + chunk_rows]
        for i in range(k):
            at_or_above[i] += (block >= cols[i]).sum(axis=0, dtype=np.int32)
    counts = np.empty((edges.shape[0], k + 1), dtype=np.int64)
    counts[:, 0] = rows - at_or_above[0]
    counts[:, 1:k] = (at_or_above[: k - 1] - at_or_above[1:]).T
    counts[:, k] = at_or_above[k - 1]
    return counts


def category_counts(values: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Counts of each known category, plus a last slot for values outside ``categories``."""
    index = np.searchsorted(categories, values)
    index = np.clip(index, 0, len(categories))
    known = (index < len(categories)) & (categories[np.minimum(index, len(categories) - 1)] == values)
    index = np.where(known, index, len(categories))
    return np.bincount(index, minlength=len(categories) + 1)


def psi(p: np.ndarray, q: np.ndarray, eps: float) -> np.ndarray:
    ps, qs = np.maximum(p, eps), np.maximum(q, eps)
    return np.asarray(np.sum((qs - ps) * np.log(qs / ps), axis=1))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import jensenshannon

    return np.asarray(np.nan_to_num(np.asarray(jensenshannon(p, q, axis=1, base=2)), nan=0.0))


def wasserstein(p: np.ndarray, q: np.ndarray, centres: np.ndarray, scale: np.ndarray) -> np.ndarray:
    cdf_gap = np.abs(np.cumsum(p, axis=1) - np.cumsum(q, axis=1))[:, :-1]
    return np.asarray(np.sum(cdf_gap * np.diff(centres, axis=1), axis=1) / scale)


MIN_EXPECTED = 5.0  # Cochran's rule: the chi² approximation needs about 5 expected rows in a cell


def pool_rare(a: np.ndarray, p: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
    """Bins the window is expected to fill with fewer than ``MIN_EXPECTED`` rows, pooled into one cell (into
    the biggest bin when even the pool is that thin). Without it a sparse bin (the counts above 0 of a column
    that is 0 in 95 % of rows, at 100 rows) makes the chi² tail far too light: 6 rows where 1 is expected give
    p ≈ 1e-6 by chi², 6e-4 exactly, and windows of in-distribution traffic alarm."""
    rare = (p * n < MIN_EXPECTED) & (p > 0)
    if not rare.any():
        return a, p
    pool_a, pool_p = (a * rare).sum(axis=1), (p * rare).sum(axis=1)
    a2, p2 = np.where(rare, 0.0, a), np.where(rare, 0.0, p)
    own = pool_p * n >= MIN_EXPECTED
    a2 = np.concatenate([a2, np.where(own, pool_a, 0.0)[:, None]], axis=1)
    p2 = np.concatenate([p2, np.where(own, pool_p, 0.0)[:, None]], axis=1)
    rows, big = np.arange(a.shape[0]), p2.argmax(axis=1)
    a2[rows, big] += np.where(own, 0.0, pool_a)
    p2[rows, big] += np.where(own, 0.0, pool_p)
    return a2, p2


def chi2_p(counts: np.ndarray, p: np.ndarray, ref_rows: int) -> np.ndarray:
    """Chi² test of homogeneity of window bin counts and reference bin counts, per row of ``counts``.

    The reference is a finite sample too (``ref_rows`` rows), so this is the two-sample test on the
    2 × bins contingency table, not a goodness-of-fit to exact fractions (which would over-reject by a
    factor of about 1 + window/reference rows). Bins empty on both sides drop out of the degrees of freedom;
    sparse bins are pooled first (:func:`pool_rare`).
    """
    from scipy.stats import chi2

    n = float(counts.sum(axis=1).max()) if counts.size else 0.0
    a, p = pool_rare(counts.astype(np.float64), p, n)
    b = p * ref_rows
    n_rows = a.sum(axis=1, keepdims=True)
    total = n_rows + ref_rows
    both = a + b
    live = both > 0
    safe = np.where(live, both, 1.0)
    ea = safe * n_rows / total
    eb = safe * ref_rows / total
    stat = np.sum(np.where(live, (a - ea) ** 2 / ea + (b - eb) ** 2 / eb, 0.0), axis=1)
    dof = np.maximum(live.sum(axis=1) - 1, 1)
    return np.asarray(chi2.sf(stat, dof))
