"""scikit-learn → bundle through skl2onnx: estimators and Pipelines, in memory or from a joblib/pickle file.

Classifiers come out with two plain tensors, ``label`` and ``probabilities`` (no ZipMap, which would
make a list of dicts that serving cannot carry). The parity proof compares ``predict`` exactly and
``predict_proba`` within 1e-5. Loading a file unpickles it, which runs code: only with ``trust_pickle``,
and even then only behind an allow-list of the globals it may import (pickle_scan).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import onnx

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_file
from slipstream.errors import ConversionError, InvalidModelError, MissingDependencyError, UntrustedPickleError
from slipstream.importers.finish import ImportJob, finish_import, name_batch_dims
from slipstream.importers.framing import Framing, ImportFraming
from slipstream.importers.parity import Reference
from slipstream.importers.pickle_scan import load_sklearn_pickle

STEP_NAME = "import.sklearn@1"
INPUT_NAME = "input"
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
    except UntrustedPickleError:
        raise
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
    if not hasattr(estimator, "predict") and not hasattr(estimator, "transform"):
        raise InvalidModelError(
            f"Expected a fitted scikit-learn estimator; got a {type(estimator).__name__}.",
            source=str(path) if path else None,
            hint="Pass the estimator (or Pipeline) after .fit().",
        )
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int):
        raise InvalidModelError(
            f"The {type(estimator).__name__} is not fitted (it has no n_features_in_).",
            source=str(path) if path else None,
            hint="Fit it before converting.",
        )
    proto = _to_onnx(estimator, n_features, frame.opset, str(path) if path else None)
    name_batch_dims(proto)
    classifier = bool(is_classifier(estimator))
    outputs = [o.name for o in proto.graph.output]
    job = ImportJob(
        framework="sklearn",
        step_name=STEP_NAME,
        default_name=path.stem if path else type(estimator).__name__.lower(),
        source_path=str(path) if path else None,
        source_sha256=sha256_file(path) if path else None,
        resolved={
            "converter": f"skl2onnx {skl2onnx.__version__}",
            "estimator": type(estimator).__name__,
            "zipmap": False,
            "input_dtype": "float32",
        },
        step_config={"opset": frame.opset, "zipmap": False, "classifier": classifier},
    )
    return finish_import(
        proto,
        output,
        job,
        frame,
        reference=sklearn_reference(estimator, outputs, classifier),
        reference_name=f"scikit-learn {type(estimator).__name__}.predict" + ("/predict_proba" if classifier else ""),
        tolerances={"float32": PROBABILITY_TOLERANCE} if classifier else None,
    )


def _to_onnx(estimator: Any, n_features: int, opset: int | None, source: str | None) -> onnx.ModelProto:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    try:
        proto = convert_sklearn(
            estimator,
            initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
            options=_no_zipmap(estimator),
            target_opset=opset,
        )
    except Exception as exc:  # skl2onnx raises RuntimeError, NotImplementedError, MissingShapeCalculator...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConversionError(
            f"skl2onnx cannot convert the {type(estimator).__name__}: {type(exc).__name__}: {first}",
            source=source,
            hint="Every step must have a skl2onnx converter (see skl2onnx's supported list); for a custom "
            "transformer, register a converter with skl2onnx.update_registered_converter.",
        ) from exc
    if not isinstance(proto, onnx.ModelProto):
        raise ConversionError("skl2onnx returned no ONNX model.", source=source)
    _dedupe_opsets(proto)
    return proto


def _no_zipmap(estimator: Any) -> dict[int, dict[str, bool]]:
    """Plain label + probability tensors for every classifier in the model (ZipMap makes a list of dicts)."""
    from sklearn.base import is_classifier

    parts = [estimator]
    if hasattr(estimator, "get_params"):
        parts += [v for v in estimator.get_params(deep=True).values() if hasattr(v, "predict_proba")]
    # A Pipeline is a classifier when its last step is; the option belongs to that step, not the Pipeline.
    return {id(p): {"zipmap": False} for p in parts if is_classifier(p) and not hasattr(p, "steps")}


def _dedupe_opsets(proto: onnx.ModelProto) -> None:
    """skl2onnx can list the same domain twice in opset_import; keep the highest version once."""
    best: dict[str, int] = {}
    for imp in proto.opset_import:
        best[imp.domain] = max(best.get(imp.domain, 0), imp.version)
    if len(best) != len(proto.opset_import):
        del proto.opset_import[:]
        for domain, ver in best.items():
            proto.opset_import.add(domain=domain, version=ver)


def sklearn_reference(estimator: Any, outputs: list[str], classifier: bool) -> Reference:
    """``predict`` (and ``predict_proba`` for classifiers), keyed by the ONNX output names."""

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(feeds[INPUT_NAME])
        if classifier:
            label, proba = outputs
            return {label: np.asarray(estimator.predict(x)), proba: np.asarray(estimator.predict_proba(x), np.float32)}
        method = estimator.predict if hasattr(estimator, "predict") else estimator.transform
        result = np.asarray(method(x))
        # skl2onnx returns a regressor's prediction as [batch, 1]
        return {outputs[0]: result.reshape(len(x), -1).astype(np.float32)}

    return run
