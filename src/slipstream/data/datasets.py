"""Datasets for evaluation, calibration and training: named input arrays plus optional labels.

Sources: an ``.npz`` (arrays named like the model inputs, plus ``labels``), a ``.csv`` or ``.parquet``
table (columns mapped to inputs), or a Python callable ``file.py:fn`` / ``pkg.module:fn`` that returns
an iterable of batches (dicts of arrays). Every source is checked against the model's input specs,
and a mismatch names the input, what was expected and what came.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.errors import ConfigError, DataError, MissingDependencyError

LABELS = "labels"


@dataclass(frozen=True)
class Dataset:
    """Whole arrays in memory, rows along axis 0, checked against the model's input specs."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Consecutive batches; the last one may be smaller."""
        if batch_size < 1:
            raise ConfigError(f"Batch size must be at least 1; got {batch_size}.", field="batch_size")
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            labels = None if self.labels is None else self.labels[start:stop]
            yield {k: v[start:stop] for k, v in self.inputs.items()}, labels

    def take(self, n: int) -> Dataset:
        """The first ``n`` rows."""
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.source)


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A content digest of named arrays (names, shapes, dtypes, bytes): keys caches on data, not paths."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.shape}:{a.dtype};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_dataset(inputs: Mapping[str, Any], labels: Any, specs: Sequence[TensorSpec], source: str) -> Dataset:
    """Validate names, dtypes, shapes and row counts; cast losslessly (float64 → float32)."""
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in inputs]
    extra = [n for n in inputs if n not in expected]
    if missing or extra:
        raise DataError(
            f"{source}: expected arrays named {expected} (and optionally '{LABELS}')"
            + f"; got {sorted(inputs)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
            + ".",
            source=source,
            hint="Name the arrays after the model's inputs (see `slipstream inspect BUNDLE`).",
        )
    checked: dict[str, np.ndarray] = {}
    rows: int | None = None
    for spec in specs:
        arr = np.asarray(inputs[spec.name])
        want = numpy_dtype(spec.dtype)
        if arr.dtype != want:
            if arr.dtype.kind == want.kind or (arr.dtype.kind in "biu" and want.kind in "fiu"):
                arr = arr.astype(want)
            else:
                raise DataError(
                    f"{source}: input '{spec.name}' must be {spec.dtype}; got {arr.dtype}.",
                    source=source,
                    hint=f"Convert it with .astype('{spec.dtype}').",
                )
        if arr.ndim != spec.rank or any(
            isinstance(d, int) and d != n for d, n in zip(spec.shape[1:], arr.shape[1:], strict=False)
        ):
            raise DataError(
                f"{source}: input '{spec.name}' must have shape {spec.shape_text()}; got {list(arr.shape)}.",
                source=source,
                hint="Rows go along axis 0; reshape the other axes to the model's.",
            )
        if rows is not None and len(arr) != rows:
            raise DataError(
                f"{source}: input '{spec.name}' has {len(arr)} rows; the other inputs have {rows}.",
                source=source,
            )
        rows = len(arr)
        checked[spec.name] = arr
    label_array = None if labels is None else np.asarray(labels)
    if label_array is not None and len(label_array) != rows:
        raise DataError(
            f"{source}: '{LABELS}' has {len(label_array)} rows; the inputs have {rows}.",
            source=source,
            hint="Give exactly one label per input row.",
        )
    if rows == 0:
        raise DataError(f"{source}: the dataset has no rows.", source=source)
    return Dataset(checked, label_array, source)


def load_npz(path: Path, specs: Sequence[TensorSpec]) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read '{path}' as .npz: {exc}.", source=str(path)) from exc
    labels = arrays.pop(LABELS, None)
    return check_dataset(arrays, labels, specs, str(path))


def load_table(
    path: Path,
    specs: Sequence[TensorSpec],
    *,
    columns: Mapping[str, Sequence[str]] | None = None,
    label_column: str | None = LABELS,
) -> Dataset:
    """A .csv or .parquet table. With one input, all non-label columns feed it unless ``columns`` says."""
    try:
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError("pyarrow", extra="data", feature="Reading .csv/.parquet data") from exc
    try:
        table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pa_csv.read_csv(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others
        raise DataError(f"Cannot read table '{path}': {exc}.", source=str(path)) from exc
    names = list(table.column_names)
    labels = None
    if label_column is not None and label_column in names:
        labels = table.column(label_column).to_numpy()
        names.remove(label_column)
    mapping = dict(columns or {})
    if not mapping:
        if len(specs) != 1:
            raise DataError(
                f"{path}: the model has {len(specs)} inputs, so the table's columns must be mapped to them.",
                source=str(path),
                hint="Give columns per input, e.g. {'age_income': ['age', 'income'], 'zip': ['zip']}.",
            )
        mapping = {specs[0].name: names}
    inputs: dict[str, np.ndarray] = {}
    for input_name, cols in mapping.items():
        unknown = [c for c in cols if c not in table.column_names]
        if unknown:
            raise DataError(
                f"{path}: columns {unknown} for input '{input_name}' are not in the table; it has {names}.",
                source=str(path),
            )
        inputs[input_name] = np.column_stack([table.column(c).to_numpy() for c in cols])
    return check_dataset(inputs, labels, specs, str(path))


def load_entry_point(ref: str) -> Any:
    """Resolve ``file.py:name`` or ``package.module:name`` to the object it names."""
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise ConfigError(f"Expected 'file.py:name' or 'package.module:name'; got {ref!r}.", field="entry_point")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise ConfigError(f"No Python file at '{path}' (from {ref!r}).", field="entry_point")
        spec = importlib.util.spec_from_file_location(f"_slipstream_user_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"Cannot import '{path}'.", field="entry_point")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_ref)
    if not hasattr(module, attr):
        raise ConfigError(f"'{module_ref}' has no attribute '{attr}' (from {ref!r}).", field="entry_point")
    return getattr(module, attr)


def load_callable(ref: str, specs: Sequence[TensorSpec]) -> Dataset:
    """A callable that returns an iterable of batches: dicts of arrays, with optional 'labels'."""
    fn = load_entry_point(ref)
    if not callable(fn):
        raise ConfigError(f"{ref!r} names a {type(fn).__name__}, not a function.", field="entry_point")
    parts: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(fn()):
        if not isinstance(batch, Mapping):
            raise DataError(
                f"{ref}: batch {i} is a {type(batch).__name__}; expected a dict of arrays named like the inputs.",
                source=ref,
            )
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value))
    if not parts:
        raise DataError(f"{ref}: the callable yielded no batches.", source=ref)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    labels = arrays.pop(LABELS, None)
    return check_dataset(arrays, labels, specs, ref)


def load_dataset(ref: str | Path, specs: Sequence[TensorSpec], **table_options: Any) -> Dataset:
    """Load data from a file or a ``file.py:fn`` reference, choosing the reader by suffix."""
    text = str(ref)
    if ":" in text and not Path(text).exists():
        return load_callable(text, specs)
    path = Path(text)
    if not path.is_file():
        raise DataError(f"No data file at '{path}'.", source=text, hint="Check the path in the recipe or option.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path, specs)
    if suffix in (".csv", ".parquet"):
        return load_table(path, specs, **table_options)
    raise DataError(
        f"Cannot read '{path}': expected .npz, .csv, .parquet or a 'file.py:fn' callable; got '{suffix}'.",
        source=text,
    )


def peek_names(ref: str | Path, *, what: str) -> set[str] | None:
    """Before any model work: check that ``ref`` exists and can be read, and return the array names it holds.

    Only an .npz can be listed without reading it whole (its names are a zip directory); for tables and
    callables this checks that the file is there and returns None. Full validation against the model's
    input specs (shapes, dtypes) happens when the specs are known, with :func:`load_dataset`.
    """
    text = str(ref)
    if ":" in text and not Path(text).exists():
        code = text.rpartition(":")[0]
        if code.endswith(".py") and not Path(code).is_file():
            raise DataError(f"{what}: no Python file at '{code}' (from {text!r}).", source=text, hint="Check the path.")
        return None
    path = Path(text)
    if not path.is_file():
        raise DataError(f"{what}: no data file at '{path}'.", source=text, hint="Check the path in the recipe.")
    if path.suffix.lower() != ".npz":
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            return set(archive.files)
    except (OSError, ValueError) as exc:
        raise DataError(f"{what}: cannot read '{path}' as .npz: {exc}.", source=text) from exc


def precheck_data(refs: Mapping[str, str | None], *, labels_for: str | None = None) -> None:
    """Check every data reference (``field -> ref``) before conversion: it exists and reads; the .npz files
    name the same inputs; with ``labels_for`` (why labels are needed), that the first one carries labels."""
    names: dict[str, set[str]] = {}
    for field, ref in refs.items():
        if ref is None:
            continue
        found = peek_names(ref, what=field)
        if found is not None:
            names[field] = found - {LABELS}
            if labels_for is not None and field == next(iter(refs)) and LABELS not in found:
                raise DataError(
                    f"{field}: {labels_for}, but '{ref}' has no '{LABELS}' array (it has {sorted(found)}).",
                    source=str(ref),
                    hint=f"Add a '{LABELS}' array to the file, or use a label-free metric (cosine or agreement).",
                )
    distinct = {frozenset(v) for v in names.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{field}: {sorted(v)}" for field, v in names.items())
        raise DataError(
            f"The data files name different inputs ({listing}).",
            source=", ".join(str(refs[f]) for f in names),
            hint="Every data file feeds the same model: name its arrays after the model's inputs.",
        )
