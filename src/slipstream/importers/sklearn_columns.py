"""The inputs a scikit-learn model is converted with: one float matrix, or one typed input per DataFrame column.

A model fitted on a numpy array takes one float matrix named ``input``. A model whose first step is a
``ColumnTransformer`` was fitted on a DataFrame and picks its columns by name: skl2onnx converts it
only when every column is declared as its own ``[batch, 1]`` input with its own type (``StringTensorType``
for text, ``Int64TensorType`` for integers, ``FloatTensorType`` for the rest), named after the column.
Clients then send one column per OIP input, text columns as BYTES.

Column names come from the fitted model (``feature_names_in_``); their types come from the sample table
when one is given, else from the fitted encoders (a column an encoder learned text categories for is text).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from slipstream.errors import ConfigError, InvalidModelError

INPUT_NAME = "input"
ColumnKind = Literal["string", "int64", "float32"]


@dataclass(frozen=True)
class Layout:
    """How the converted model takes its inputs: ``columns`` is empty for the single-matrix layout."""

    n_features: int
    columns: tuple[tuple[str, ColumnKind], ...] = ()
    # The names a single-matrix model was fitted with (a DataFrame without a ColumnTransformer), if any.
    matrix_names: tuple[str, ...] = ()

    @property
    def by_column(self) -> bool:
        return bool(self.columns)

    def initial_types(self) -> list[tuple[str, Any]]:
        """skl2onnx's ``initial_types`` for this layout."""
        from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType

        if not self.by_column:
            return [(INPUT_NAME, FloatTensorType([None, self.n_features]))]
        kinds = {"string": StringTensorType, "int64": Int64TensorType, "float32": FloatTensorType}
        return [(name, kinds[kind]([None, 1])) for name, kind in self.columns]

    def describe(self) -> dict[str, str]:
        """For the manifest: column name → dtype (or the single matrix)."""
        return dict(self.columns) if self.by_column else {INPUT_NAME: f"float32[batch, {self.n_features}]"}

    def frame(self, feeds: Mapping[str, np.ndarray]) -> Any:
        """What the scikit-learn model takes for these ONNX feeds: a DataFrame, or the float matrix."""
        if not self.by_column and not self.matrix_names:
            return np.asarray(feeds[INPUT_NAME])
        import pandas as pd

        if not self.by_column:
            return pd.DataFrame(np.asarray(feeds[INPUT_NAME]), columns=list(self.matrix_names))

        return pd.DataFrame({name: np.asarray(feeds[name]).reshape(-1) for name, _ in self.columns})


def _first_step(estimator: Any) -> Any:
    while hasattr(estimator, "steps"):
        estimator = estimator.steps[0][1]
    return estimator


def _text_columns(transformer: Any) -> set[str | int]:
    """Columns (names, or positions) a fitted ColumnTransformer feeds to an encoder that learned text categories."""
    text: set[str | int] = set()
    for _, step, cols in getattr(transformer, "transformers_", []):
        encoder = _first_step(step)
        categories = getattr(encoder, "categories_", None)
        if categories is None or isinstance(cols, str | int) or not np.iterable(cols):
            continue
        for col, cats in zip(cols, categories, strict=False):
            if isinstance(col, str | int | np.integer) and np.asarray(cats).dtype.kind in "OUS":
                text.add(col if isinstance(col, str) else int(col))
    return text


def _kind(values: np.ndarray) -> ColumnKind:
    kind = values.dtype.kind
    if kind in "OUS":
        return "string"
    return "int64" if kind in "iub" else "float32"


def layout_of(estimator: Any, sample: Mapping[str, np.ndarray] | None, source: str | None) -> Layout:
    """The input layout ``estimator`` converts with, given the sample columns (if any)."""
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int):
        raise InvalidModelError(
            f"The {type(estimator).__name__} is not fitted (it has no n_features_in_).",
            source=source,
            hint="Fit it before converting.",
        )
    names = getattr(estimator, "feature_names_in_", None)
    first = _first_step(estimator)
    if names is not None and type(first).__name__ != "ColumnTransformer":
        return Layout(n_features, matrix_names=tuple(str(n) for n in names))
    if names is None:
        if _text_columns(first):  # skl2onnx would declare one float matrix and fail on the first category
            raise InvalidModelError(
                f"The {type(first).__name__} picks text columns by position from an array; such a model has no "
                "column names, so its columns cannot become separate typed inputs.",
                source=source,
                hint="Fit the pipeline on a pandas DataFrame (named columns, text as str): each column then becomes "
                "its own input, text columns as BYTES.",
            )
        return Layout(n_features)
    names = [str(n) for n in names]
    if sample is not None and set(names) <= set(sample):
        kinds = {n: _kind(np.asarray(sample[n])) for n in names}
    else:
        text = _text_columns(first)
        kinds = {n: ("string" if n in text else "float32") for n in names}
    return Layout(n_features, tuple((n, kinds[n]) for n in names))


def sample_for(layout: Layout, sample: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """The sample keyed by the converted model's inputs: a table's columns stacked when the model takes a matrix."""
    if sample is None or layout.by_column or INPUT_NAME in sample or len(sample) != layout.n_features:
        return sample
    if not all(np.asarray(v).ndim == 2 and np.asarray(v).shape[1] == 1 for v in sample.values()):
        return sample  # not a table's columns: align_sample will say what is wrong
    return {INPUT_NAME: np.hstack([np.asarray(v, dtype=np.float32) for v in sample.values()])}


def require_rows_for_text(layout: Layout, sample: Mapping[str, np.ndarray] | None) -> None:
    """Text columns cannot be made up: the parity proof needs real rows (unknown categories make sklearn raise)."""
    text = [n for n, k in layout.columns if k == "string"]
    if text and sample is None:
        raise ConfigError(
            f"The model takes text columns {text}; the parity proof needs real rows for them, and none were given.",
            field="sample_data",
            hint="Pass sample=<a DataFrame of real rows> (or --sample rows.parquet / rows.csv), or skip_parity=True.",
        )
