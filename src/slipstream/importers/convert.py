"""One entry point that picks the importer for a source model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from slipstream.artifact.bundle import Bundle
from slipstream.errors import ConversionError
from slipstream.importers.framing import ImportFraming, SampleSource
from slipstream.importers.onnx import import_onnx
from slipstream.importers.torch_sources import is_entry_point
from slipstream.importers.transformers_dir import Task

FrameworkChoice = Literal[
    "auto", "onnx", "keras", "tensorflow", "tflite", "torch", "sklearn", "boosting", "transformers"
]

_SUFFIXES: dict[str, str] = {".onnx": "onnx", ".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".tflite": "tflite"}
_SUFFIXES |= {".pt": "torch", ".pth": "torch", ".pt2": "torch", ".joblib": "sklearn", ".pkl": "sklearn"}
# Native boosting files (LightGBM .txt, XGBoost .json/.ubj, CatBoost .cbm); their pickles go through "sklearn".
_SUFFIXES |= dict.fromkeys((".txt", ".json", ".ubj", ".cbm"), "boosting")


def detect_object(model: object) -> str:
    """The framework of an in-memory model, from the modules its classes come from (nothing imported)."""
    roots = {cls.__module__.partition(".")[0] for cls in type(model).__mro__}
    # Boosting wrappers subclass scikit-learn's base classes: look for them first.
    pairs = [("torch", "torch"), *((lib, "boosting") for lib in ("lightgbm", "xgboost", "catboost"))]
    for root, framework in (*pairs, ("sklearn", "sklearn"), ("keras", "keras")):
        if root in roots:
            return framework
    raise ConversionError(
        f"Cannot tell the framework of an in-memory {type(model).__name__}; "
        "this version converts torch modules, scikit-learn estimators, LightGBM/XGBoost/CatBoost models and "
        "Keras models from memory.",
        hint="Save the model to a file, or pass framework=... explicitly.",
    )


def detect_framework(path: Path) -> str:
    if not path.exists() and is_entry_point(str(path)):
        return "torch"  # FILE.py:FACTORY or package.module:FACTORY
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "tensorflow"
    if path.is_dir() and (path / "config.json").is_file():
        return "transformers"  # a save_pretrained directory
    framework = _SUFFIXES.get(path.suffix.lower())
    if framework is None:
        raise ConversionError(
            f"Cannot tell the framework of '{path}' from its suffix '{path.suffix}'; "
            f"this version converts {', '.join(sorted(_SUFFIXES))} files.",
            source=str(path),
            hint="Export the model to ONNX first, or pass --framework.",
        )
    return framework


def convert(
    source: str | os.PathLike[str] | Any,
    output: str | os.PathLike[str],
    *,
    framework: FrameworkChoice = "auto",
    name: str | None = None,
    version: str = "1",
    overwrite: bool = False,
    signature: str = "serving_default",
    custom_objects: str | None = None,
    trust_pickle: bool = False,
    skip_parity: bool = False,
    sample: SampleSource = None,
    example_inputs: Any = None,
    input_shapes: list[str] | None = None,
    input_dtypes: list[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | list[str] | None = None,
    exporter: Literal["dynamo", "torchscript"] | None = None,
    opset: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    task: Task | None = None,
) -> Bundle:
    """Convert a source model into a verified bundle at ``output``.

    ``signature`` picks a SavedModel signature; ``custom_objects`` ("module:dict") and ``trust_pickle``
    let Keras files that carry code load; ``sample`` (arrays, an .npz, or a DataFrame / .parquet / .csv
    table for a model with one input per column) feeds the parity proof.
    ``source`` may also be an in-memory torch module or scikit-learn estimator, or a PyTorch entry point
    ``FILE.py:FACTORY``. PyTorch takes ``example_inputs`` (or ``input_shapes`` like "batch,1,8,8" with
    ``input_dtypes``), ``dynamic_axes`` ("INPUT:AXIS=NAME"), ``exporter`` and ``opset``. A transformers
    ``save_pretrained`` directory converts for ``task`` (inferred from its config when None); giving a
    ``task`` means the source is such a directory.
    """
    if not isinstance(source, str | os.PathLike):
        chosen = detect_object(source) if framework == "auto" else framework
    else:
        auto = "transformers" if task is not None else detect_framework(Path(source))
        chosen = auto if framework == "auto" else framework
    framing = ImportFraming(
        name=name, version=version, overwrite=overwrite, opset=opset, sample=sample, skip_parity=skip_parity
    )
    if chosen == "torch":
        from slipstream.importers.torch import import_torch

        return import_torch(
            source, output, example_inputs=example_inputs, input_shapes=input_shapes, input_dtypes=input_dtypes,
            dynamic_axes=dynamic_axes, exporter=exporter, input_names=input_names, output_names=output_names,
            trust_pickle=trust_pickle, **framing,
        )  # fmt: skip
    if chosen == "transformers":
        from slipstream.importers.transformers_dir import import_transformers_dir

        return import_transformers_dir(
            source, output, task=task, exporter=exporter, output_names=output_names, **framing
        )
    if chosen == "sklearn":
        from slipstream.importers.sklearn import import_sklearn

        return import_sklearn(source, output, trust_pickle=trust_pickle, **framing)
    if chosen == "boosting":
        from slipstream.importers.boosting import import_boosting

        return import_boosting(source, output, trust_pickle=trust_pickle, **framing)
    if chosen == "keras":
        from slipstream.importers.keras import import_keras

        return import_keras(source, output, custom_objects=custom_objects, trust_pickle=trust_pickle, **framing)
    if not isinstance(source, str | os.PathLike):
        raise ConversionError(f"Framework {chosen!r} converts files; got an in-memory {type(source).__name__}.")
    path = Path(source)
    if chosen == "onnx":
        return import_onnx(path, output, name=name, version=version, overwrite=overwrite)
    if chosen == "tensorflow":
        from slipstream.importers.keras import import_saved_model

        return import_saved_model(path, output, signature=signature, **framing)
    if chosen == "tflite":
        from slipstream.importers.tflite import import_tflite

        return import_tflite(path, output, **framing)
    raise ConversionError(f"Framework {chosen!r} is not supported.", source=str(path))
