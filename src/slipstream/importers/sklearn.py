"""scikit-learn → bundle through skl2onnx: estimators and Pipelines, in memory or from a joblib/pickle file.

Classifiers come out with two plain tensors, ``label`` and ``probabilities`` (no ZipMap, which would
make a list of dicts that serving cannot carry). The parity proof compares ``predict`` exactly and
``predict_proba`` within 1e-5. Loading a file unpickles it, which runs code: only with ``trust_pickle``,
and even then only behind an allow-list of the globals it may import (pickle_scan).

A model fitted on a DataFrame through a ``ColumnTransformer`` takes one input per column, typed and named
after it (sklearn_columns); its parity proof runs on real rows given as a DataFrame or a .parquet/.csv
sample. Opsets, HistGradientBoosting and refusals by name are handled in sklearn_convert. LightGBM,
XGBoost and CatBoost models (their scikit-learn wrappers included) go to importers.boosting.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Unpack

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_file
from slipstream.errors import InvalidModelError, MissingDependencyError, UntrustedPickleError
from slipstream.importers.boosting import boosting_library, import_loaded
from slipstream.importers.finish import ImportJob, finish_import, name_batch_dims
from slipstream.importers.framing import Framing, ImportFraming
from slipstream.importers.parity import Reference
from slipstream.importers.pickle_scan import load_sklearn_pickle
from slipstream.importers.sklearn_columns import Layout, layout_of, require_rows_for_text, sample_for
from slipstream.importers.sklearn_convert import target_opsets, to_onnx

STEP_NAME = "import.sklearn@1"
# The bar for probabilities; labels are integers or strings and are compared exactly.
PROBABILITY_TOLERANCE = (1e-5, 0.0)


def _require(package: str, feature: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise MissingDependencyError(package, extra="sklearn", feature=feature)


def load_estimator(path: Path, *, trust_pickle: bool, allow_pickle_globals: Iterable[str] = ()) -> Any:
    """Unpickle an estimator from a joblib or pickle file, only when the caller trusts it.

    Even then every global the file names is checked against an allow-list before it is imported
    (slipstream.importers.pickle_scan): a crafted file is refused before its code runs.
    """
    if not path.is_file():
        raise InvalidModelError(f"Expected a joblib/pickle file at '{path}'; there is none.", source=str(path))
    if not trust_pickle:
        raise UntrustedPickleError(
            f"'{path}' is a joblib/pickle file. Loading it runs arbitrary Python code stored in the file, "
            "so slipstream does not load it unless told to trust it.",
            source=str(path),
            hint="If you trust where this file came from, pass --trust-pickle (trust_pickle=True); or convert "
            "the estimator in memory with slipstream.convert(estimator, out).",
        )
    try:
        return load_sklearn_pickle(path, extra_allowed=allow_pickle_globals)
    except (UntrustedPickleError, MissingDependencyError):
        raise
    except ModuleNotFoundError as exc:  # a class from a package that is not installed here
        package = (exc.name or "").partition(".")[0]
        raise InvalidModelError(
            f"'{path}' holds an object from the package '{package}', which is not installed.",
            source=str(path),
            hint=f"Install it (pip install {package}), at the version that saved the file, and convert again.",
        ) from exc
    except Exception as exc:  # unpickling raises anything the pickled code raises
        raise InvalidModelError(
            f"'{path}' could not be unpickled ({type(exc).__name__}: {exc}).",
            source=str(path),
            hint="Unpickle it with the scikit-learn version that saved it, or re-save it here.",
        ) from exc


def import_sklearn(
    source: object,
    output: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    allow_pickle_globals: Iterable[str] = (),
    **framing: Unpack[ImportFraming],
) -> Bundle:
    """Convert a fitted scikit-learn estimator or Pipeline (or a file holding one) into a bundle.

    A file is unpickled only with ``trust_pickle``, and only if every global it names is on the allow-list
    (scikit-learn classes, numpy arrays/dtypes/ufuncs, scipy sparse matrices, plain containers) or in
    ``allow_pickle_globals`` (``module.name`` entries the caller vouches for).
    """
    frame = Framing.begin(framing)
    _require("sklearn", "Converting a scikit-learn model")
    _require("skl2onnx", "Converting a scikit-learn model")
    import skl2onnx
    from sklearn.base import is_classifier

    path: Path | None = None
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        estimator = load_estimator(path, trust_pickle=trust_pickle, allow_pickle_globals=allow_pickle_globals)
    else:
        estimator = source
    if boosting_library(estimator) is not None:  # a LightGBM/XGBoost/CatBoost wrapper: its own converter
        return import_loaded(estimator, output, frame, path)
    label = str(path) if path else None
    if not hasattr(estimator, "predict") and not hasattr(estimator, "transform"):
        raise InvalidModelError(
            f"Expected a fitted scikit-learn estimator; got a {type(estimator).__name__}.",
            source=label,
            hint="Pass the estimator (or Pipeline) after .fit().",
        )
    layout = layout_of(estimator, frame.sample, label)
    if not frame.skip_parity:
        require_rows_for_text(layout, frame.sample)
    frame = dataclasses.replace(frame, sample=sample_for(layout, frame.sample))
    opsets = target_opsets(frame.opset)
    proto = to_onnx(estimator, layout, opsets, label)
    name_batch_dims(proto)
    classifier = bool(is_classifier(estimator))
    outputs = [o.name for o in proto.graph.output]
    job = ImportJob(
        framework="sklearn",
        step_name=STEP_NAME,
        default_name=path.stem if path else type(estimator).__name__.lower(),
        source_path=label,
        source_sha256=sha256_file(path) if path else None,
        resolved={
            "converter": f"skl2onnx {skl2onnx.__version__}",
            "estimator": type(estimator).__name__,
            "zipmap": False,
            "input_dtype": "per column" if layout.by_column else "float32",
            "columns": dict(layout.describe()),
            "target_opsets": {"ai.onnx": opsets[""], "ai.onnx.ml": opsets["ai.onnx.ml"]},
        },
        step_config={"opset": frame.opset, "zipmap": False, "classifier": classifier},
    )
    return finish_import(
        proto,
        output,
        job,
        frame,
        reference=sklearn_reference(estimator, outputs, classifier, layout),
        reference_name=f"scikit-learn {type(estimator).__name__}.{_methods(estimator, classifier)}",
        tolerances={"float32": PROBABILITY_TOLERANCE} if classifier else None,
    )


def _methods(estimator: Any, classifier: bool) -> str:
    if classifier:
        return "predict/predict_proba" if hasattr(estimator, "predict_proba") else "predict/decision_function"
    return "predict" if hasattr(estimator, "predict") else "transform"


def sklearn_reference(estimator: Any, outputs: list[str], classifier: bool, layout: Layout | None = None) -> Reference:
    """``predict`` (and ``predict_proba`` for classifiers), keyed by the ONNX output names.

    The feeds are turned back into what the model was fitted on (a DataFrame for the per-column layout).
    An outlier detector's ONNX model gives its label and its ``decision_function`` score.
    """
    shape = layout or Layout(int(getattr(estimator, "n_features_in_", 0)))

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = shape.frame(feeds)
        n = len(x)
        if classifier and hasattr(estimator, "predict_proba"):
            label, proba = outputs
            return {label: np.asarray(estimator.predict(x)), proba: np.asarray(estimator.predict_proba(x), np.float32)}
        if classifier:  # no probabilities (SVC): skl2onnx gives decision_function scores, [d, -d] when binary
            label, scores = outputs
            d = np.asarray(estimator.decision_function(x), np.float32)
            return {label: np.asarray(estimator.predict(x)), scores: np.column_stack([d, -d]) if d.ndim == 1 else d}
        if len(outputs) == 2 and hasattr(estimator, "decision_function"):
            label, scores = outputs  # IsolationForest, OneClassSVM: the label and the decision_function score
            score = np.asarray(estimator.decision_function(x), np.float32).reshape(n, -1)
            return {label: np.asarray(estimator.predict(x)).reshape(n, -1).astype(np.int64), scores: score}
        method = estimator.predict if hasattr(estimator, "predict") else estimator.transform
        result = np.asarray(method(x))
        # skl2onnx returns a regressor's prediction as [batch, 1]
        return {outputs[0]: result.reshape(n, -1).astype(np.float32)}

    return run
