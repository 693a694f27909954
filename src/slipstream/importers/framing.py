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
SampleSource = SampleData | str | os.PathLike[str] | None


class ImportFraming(TypedDict, total=False):
    """The keywords every importer accepts besides its source and framework-specific settings."""

    name: str | None  # the bundle's model name (default: from the source)
    version: str  # the bundle's model version
    overwrite: bool  # replace an existing bundle at the output path
    opset: int | None  # ai.onnx opset to export to (default: the importer's)
    sample: SampleSource  # real inputs for the parity proof: arrays or an .npz, keyed by input name
    skip_parity: bool  # write the bundle without the proof (recorded in the manifest)


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
        )

    def model_name(self, default: str) -> str:
        return self.name or default


def load_sample_data(sample: SampleSource) -> dict[str, np.ndarray] | None:
    """Read sample inputs from an .npz file (one array per model input, keyed by input name)."""
    if sample is None:
        return None
    if isinstance(sample, Mapping):
        return {str(k): np.asarray(v) for k, v in sample.items()}
    path = Path(sample)
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise ConfigError(
            f"Expected sample data as an existing .npz file; got '{path}'.",
            field="sample_data",
            hint="Save it with numpy.savez('sample.npz', input_name=array, ...).",
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
