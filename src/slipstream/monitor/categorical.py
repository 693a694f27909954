"""String (BYTES) input columns as categories: reference frequencies, window counts, unseen values, drift.

A string column has no order, so decile bins, quantiles and means mean nothing for it; its distribution is
the share of each category. The profile keeps, per column, the ``top_k`` most frequent reference categories
and an ``other`` bucket for the rest of the reference's vocabulary (stored too, up to ``max_vocabulary``
names, so that a later value can be told apart as *known but rare* or *never seen*). A window is counted
into the same buckets plus one more, ``unseen``: values the reference never had. Its reference share is 0
(or, when the vocabulary was too large to store whole, the share of reference rows outside the stored
names, so that the test stays fair).

Drift is then decided exactly like a numeric column's decile bins (:mod:`.binning`): the two-sample chi²
test on the buckets with sparse ones pooled, corrected together with every other test of the window, and
PSI as the effect size. A flood of unseen values fills a bucket the reference left empty, which the chi²
test counts in full (a cell empty on one side only still has expected rows on the other) and PSI sees
through its epsilon floor. The unseen count and share are reported besides, because "12 % of today's
``city`` values were never seen" is the actionable part.

Columns are tensors of dtype object/bytes/str, rank 1 (one column) or 2 (one column per feature). Codes
(bucket indices, int16) are what the server's rolling window keeps: two bytes a value instead of a string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from slipstream.errors import DataError, InputError
from slipstream.frozen import Frozen

MAX_EXAMPLES = 5  # unseen values named in a report, so that a person can see what arrived


class CategoricalFeature(Frozen):
    """One string column of the reference: its top categories, its other known ones, and their shares."""

    tensor: str = Field(description="The input tensor the column belongs to.")
    feature: str = Field(description="Feature name: the tensor's name (rank 1) or 'name[j]' (column j).")
    column: int | None = Field(description="Column index in a rank-2 tensor; None for a rank-1 tensor.")
    categories: list[str] = Field(description="The top_k most frequent reference categories, most frequent first.")
    other: list[str] = Field(description="The rest of the reference vocabulary (sorted), up to max_vocabulary.")
    fractions: list[float] = Field(
        description="Reference share per bucket: each top category, then 'other', then 'unseen' (values "
        "outside the stored vocabulary; 0 unless the vocabulary was truncated)."
    )
    distinct: int = Field(ge=0, description="Distinct categories in the reference (stored or not).")

    @property
    def buckets(self) -> int:
        return len(self.categories) + 2


class CategoricalDrift(Frozen):
    """What one string column's window looked like next to the reference (the verdict is in its DriftTable)."""

    tensor: str
    feature: str
    rows: int = Field(ge=0, description="Window rows counted.")
    unseen_rows: int = Field(ge=0, description="Window values the reference never had.")
    unseen_share: float = Field(ge=0, le=1, description="unseen_rows / rows.")
    unseen_examples: list[str] = Field(default_factory=list, description="A few unseen values (compare path only).")
    categories: list[str] = Field(description="The reference's top categories, then 'other' and 'unseen'.")
    reference_shares: list[float] = Field(description="Reference share per bucket (as in the profile).")
    window_shares: list[float] = Field(description="Window share per bucket.")


def is_categorical(array: np.ndarray) -> bool:
    """Strings (BYTES inputs arrive as object arrays of bytes; numpy 'S'/'U' arrays too)."""
    return np.asarray(array).dtype.kind in "OSU"


def as_text(values: np.ndarray) -> np.ndarray:
    """Any string-like array as a unicode array of the same shape (bytes decoded as UTF-8, bad bytes replaced)."""
    a = np.asarray(values)
    if a.dtype.kind == "U":
        return a
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8", errors="replace")
    flat = [v.decode("utf-8", errors="replace") if isinstance(v, bytes | bytearray) else str(v) for v in a.ravel()]
    return np.asarray(flat, dtype=str).reshape(a.shape)


def _columns(name: str, array: np.ndarray) -> list[tuple[str, int | None, np.ndarray]]:
    a = np.asarray(array)
    if a.ndim == 1:
        return [(name, None, a)]
    if a.ndim == 2:
        return [(f"{name}[{j}]", j, a[:, j]) for j in range(a.shape[1])]
    raise DataError(
        f"String tensor '{name}' has rank {a.ndim}; the monitor reads string columns of rank 1 or 2.",
        source=name,
        hint="Send one string column per input ([batch] or [batch, columns]).",
    )


def profile_categorical(name: str, array: np.ndarray, *, top_k: int, max_vocabulary: int) -> list[CategoricalFeature]:
    """The reference side of every column of one string tensor."""
    out = []
    for feature, column, values in _columns(name, as_text(array)):
        uniq, counts = np.unique(values, return_counts=True)
        order = np.lexsort((uniq, -counts))  # most frequent first, ties by name: deterministic
        top, rest = order[:top_k], order[top_k:]
        # The rest of the vocabulary by name; past max_vocabulary the less frequent names are not stored.
        stored = np.sort(rest[:max_vocabulary])  # rest is by frequency: keep the most frequent names
        stored = stored[np.argsort(uniq[stored])]
        n = float(values.shape[0])
        known_other, other_total = float(counts[stored].sum()), float(counts[rest].sum())
        fractions = [*(counts[top] / n).tolist(), known_other / n, (other_total - known_other) / n]
        out.append(
            CategoricalFeature(
                tensor=name,
                feature=feature,
                column=column,
                categories=uniq[top].tolist(),
                other=uniq[stored].tolist(),
                fractions=fractions,
                distinct=int(uniq.size),
            )
        )
    return out


def codes(feature: CategoricalFeature, values: np.ndarray) -> np.ndarray:
    """Bucket index of every value: ``0..k-1`` top categories, ``k`` other known, ``k+1`` unseen (int16)."""
    k = len(feature.categories)
    lookup = {c: i for i, c in enumerate(feature.categories)} | dict.fromkeys(feature.other, k)
    uniq, inverse = np.unique(as_text(values), return_inverse=True)
    mapped = np.fromiter((lookup.get(u, k + 1) for u in uniq.tolist()), dtype=np.int16, count=uniq.size)
    return mapped[inverse.reshape(-1)]


def tensor_codes(features: Sequence[CategoricalFeature], array: np.ndarray) -> np.ndarray:
    """``[rows, columns]`` codes of one string tensor, one column per profiled feature (for the rolling window)."""
    a = np.asarray(array)
    if a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[1] != len(features)) or (a.ndim == 1 and len(features) != 1):
        raise InputError(
            f"String tensor '{features[0].tensor}' has shape {list(a.shape)}; the profile has "
            f"{len(features)} column(s).",
            input_name=features[0].tensor,
            hint="The profile belongs to another model; rebuild it for this bundle.",
        )
    cols = [codes(f, a if f.column is None else a[:, f.column]) for f in features]
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class CategoricalWindow:
    """One string tensor's window, counted: a row per column, padded to the widest column's buckets."""

    name: str
    names: list[str]
    counts: np.ndarray  # [columns, width] window counts
    fractions: np.ndarray  # [columns, width] reference shares (0 in padding)
    details: list[CategoricalDrift]


def count_window(features: Sequence[CategoricalFeature], array: np.ndarray) -> CategoricalWindow:
    """Count a window of one string tensor (strings, or the codes :func:`tensor_codes` made) into buckets."""
    a = np.asarray(array)
    given_codes = a.dtype.kind in "iu"
    code_matrix = a.reshape(a.shape[0], -1) if given_codes else tensor_codes(features, a)
    width = max(f.buckets for f in features)
    counts = np.zeros((len(features), width), dtype=np.int64)
    fractions = np.zeros((len(features), width), dtype=np.float64)
    details = []
    rows = code_matrix.shape[0]
    for j, f in enumerate(features):
        c = np.bincount(code_matrix[:, j].astype(np.int64), minlength=f.buckets)[: f.buckets]
        counts[j, : f.buckets] = c
        fractions[j, : f.buckets] = f.fractions
        examples: list[str] = []
        if not given_codes and c[-1]:
            column = a if f.column is None else a[:, f.column]
            unseen = as_text(column)[code_matrix[:, j] == f.buckets - 1]
            examples = np.unique(unseen)[:MAX_EXAMPLES].tolist()
        details.append(
            CategoricalDrift(
                tensor=f.tensor,
                feature=f.feature,
                rows=rows,
                unseen_rows=int(c[-1]),
                unseen_share=float(c[-1]) / rows if rows else 0.0,
                unseen_examples=examples,
                categories=[*f.categories, "other", "unseen"],
                reference_shares=list(f.fractions),
                window_shares=(c / max(rows, 1)).tolist(),
            )
        )
    name = features[0].tensor
    return CategoricalWindow(name, [f.feature for f in features], counts, fractions, details)


def by_tensor(features: Sequence[CategoricalFeature]) -> dict[str, list[CategoricalFeature]]:
    """The profiled string columns grouped by tensor, in profile order."""
    grouped: dict[str, list[CategoricalFeature]] = {}
    for f in features:
        grouped.setdefault(f.tensor, []).append(f)
    return grouped


def categorical_inputs(
    inputs: Mapping[str, np.ndarray], *, top_k: int, max_vocabulary: int
) -> list[CategoricalFeature]:
    """Profile every string tensor among ``inputs`` (numeric ones are left to the numeric profile)."""
    out: list[CategoricalFeature] = []
    for name, array in inputs.items():
        if is_categorical(np.asarray(array)):
            out += profile_categorical(name, array, top_k=top_k, max_vocabulary=max_vocabulary)
    return out
