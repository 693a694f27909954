"""The options every importer shares, declared once: name, version, overwrite, opset, sample data, skip-parity.

Each framework importer used to declare these six keywords itself, default the opset, load the sample
file and start its clock in its own words; four copies drifted (``sample`` in one, ``sample_data`` in
another). Now an importer takes ``**framing: Unpack[ImportFraming]`` and opens with
:meth:`Framing.begin`, which reads the sample data before any export work, so a missing or unreadable
``--sample`` fails in a second, not after a minute of tracing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from slipstream.data.datasets import LABELS
from slipstream.errors import ConfigError

SampleData = Mapping[str, np.ndarray]
# A pandas DataFrame is accepted too (typed as object: pandas is an optional dependency).
SampleSource = SampleData | str | os.PathLike[str] | object | None
# Tables whose columns become one [rows, 1] input each (the layout of a scikit-learn ColumnTransformer model).
TABLE_SUFFIXES = (".parquet", ".csv")


class ImportFraming(TypedDict, total=False):
    """The keywords every importer accepts besides its source and framework-specific settings."""

    name: str | None  # the bundle's model name (default: from the source)
    version: str  # the bundle's model version
    overwrite: bool  # replace an existing bundle at the output path
    opset: int | None  # ai.onnx opset to export to (default: the importer's)
    sample: SampleSource  # real inputs for the parity proof: arrays or an .npz keyed by input name, or a table
    skip_parity: bool  # write the bundle without the proof (recorded in the manifest)
    parity_lengths: tuple[int, ...] | None  # sizes of non-batch symbolic dims in generated parity inputs


@dataclass(frozen=True)
class Framing:
    """:class:`ImportFraming` resolved: defaults applied, sample data loaded, the import's clock started."""

    name: str | None
    version: str
    overwrite: bool
    opset: int | None
    sample: dict[str, np.ndarray] | None
    skip_parity: bool
    started: float
    # Sizes given to symbolic non-batch dims (a sequence) in generated parity inputs; None: the proof's default.
    parity_lengths: tuple[int, ...] | None = None

    @classmethod
    def begin(cls, options: ImportFraming, *, default_opset: int | None = None) -> Framing:
        """Resolve ``options`` at the start of an import (sample data is read here, before any export)."""
        return cls(
            name=options.get("name"),
            version=options.get("version", "1"),
            overwrite=options.get("overwrite", False),
            opset=options.get("opset") or default_opset,
            sample=load_sample_data(options.get("sample")),
            skip_parity=options.get("skip_parity", False),
            started=time.perf_counter(),
            parity_lengths=options.get("parity_lengths"),
        )

    def model_name(self, default: str) -> str:
        return self.name or default


def load_sample_data(sample: SampleSource) -> dict[str, np.ndarray] | None:
    """Read sample inputs: arrays keyed by input name (a mapping or an .npz file), or a table.

    A table (a pandas DataFrame, or a .parquet/.csv file) gives one ``[rows, 1]`` array per column, named
    after the column: strings as an object array, integers and floats as they are.
    """
    if sample is None:
        return None
    if isinstance(sample, Mapping):
        return {str(k): np.asarray(v) for k, v in sample.items()}
    if hasattr(sample, "columns") and hasattr(sample, "to_numpy"):  # a DataFrame, without importing pandas
        return table_columns(sample)
    if not isinstance(sample, str | os.PathLike):
        raise ConfigError(
            f"Expected sample data as arrays, a DataFrame or a file; got a {type(sample).__name__}.",
            field="sample_data",
            hint="Pass a dict of arrays keyed by input name, a pandas DataFrame, or an .npz/.parquet/.csv path.",
        )
    path = Path(sample)
    if path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
        return table_columns(_read_table(path))
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise ConfigError(
            f"Expected sample data as an existing .npz, .parquet or .csv file; got '{path}'.",
            field="sample_data",
            hint="Save it with numpy.savez('sample.npz', input_name=array, ...), or DataFrame.to_parquet.",
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Cannot read sample data '{path}' as .npz: {exc}.",
            field="sample_data",
            hint="Save it with numpy.savez('sample.npz', input_name=array, ...).",
        ) from exc


def _read_table(path: Path) -> object:
    try:
        import pandas as pd
    except ImportError as exc:
        raise ConfigError(
            f"Reading sample data from '{path}' needs pandas, which is not installed.",
            field="sample_data",
            hint="pip install 'slipstream[sklearn]', or save the sample as .npz.",
        ) from exc
    try:
        return pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"Cannot read sample data '{path}': {exc}.", field="sample_data") from exc


def table_columns(frame: object) -> dict[str, np.ndarray]:
    """One ``[rows, 1]`` array per column of a DataFrame: text as object arrays of ``str``, numbers as they are."""
    columns: dict[str, np.ndarray] = {}
    for name in frame.columns:  # type: ignore[attr-defined]
        values = np.asarray(frame[name].to_numpy())  # type: ignore[index]
        if values.dtype.kind in "OUS":  # pandas text (object or StringDtype) comes out as object
            values = values.astype(str).astype(object)
        columns[str(name)] = values.reshape(-1, 1)
    return columns


def match_sample_names(sample: SampleData, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Sample arrays keyed by the model's input names (by position for unnamed ``arr_N`` keys).

    Importers call it as soon as they know the input names, before exporting where they can, so that a
    sample for another model fails before the export rather than after it.
    """
    # The same .npz serves evaluation elsewhere: its 'labels' array is not an input, so it is ignored here.
    arrays = {k: np.asarray(v) for k, v in sample.items() if not (k == LABELS and k not in names)}
    keys = list(arrays)
    if set(keys) != set(names) and keys == [f"arr_{i}" for i in range(len(keys))] and len(keys) == len(names):
        arrays = dict(zip(names, arrays.values(), strict=True))
    if set(arrays) != set(names):
        raise ConfigError(
            f"Sample data has arrays {sorted(arrays)}; the model's inputs are {list(names)}.",
            field="sample_data",
            hint="Name each array in the .npz after the model input it feeds.",
        )
    return arrays
