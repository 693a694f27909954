"""Vectorized binning of every column at once against per-column edges.

Edges are a ``[features, k]`` matrix, sorted along each row; a column with fewer distinct edges repeats its
last edge, which leaves the bins between equal edges empty for the reference and the window alike. A value
``x`` falls in bin ``i`` = the number of edges ``<= x`` (so bins are ``[e_{i-1}, e_i)``; NaN counts as below
every edge). Counting costs ``k`` comparison passes over the window and no per-column Python loop: the
number of values at or above each edge is one ``count_nonzero`` per edge, and bin counts are differences of
those.
"""

from __future__ import annotations

import numpy as np


def decile_edges(reference: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """``[features, len(levels)]`` edges at the given quantile levels; duplicates collapse to the right."""
    # Equal neighbouring edges are fine as they are (empty bins between them), and already sorted.
    return np.asarray(np.quantile(reference, levels, axis=0).T.copy())


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
