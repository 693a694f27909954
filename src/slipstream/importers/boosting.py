"""LightGBM, XGBoost and CatBoost → bundle: native model files, or pickles of their scikit-learn wrappers.

LightGBM and XGBoost go through onnxmltools (the converters skl2onnx itself delegates to); CatBoost through
its own exporter (``save_model(format="onnx")``), since onnxmltools has none for it. All three are optional
(``pip install 'slipstream[boosting]'``) and imported only here, only when such a model is converted.

Every bundle comes out in one shape whatever the library, so that clients and the monitor need not know
which one trained it: one float input ``input`` of ``[batch, features]``; a classifier answers ``label``
(``[batch]``) and ``probabilities`` (``[batch, classes]``, no ZipMap: CatBoost's list of dicts is cut off
at its probability tensor); a regressor answers ``variable`` (``[batch, 1]``). The converters declare some
of these shapes wrongly (LightGBM's label as ``[1]``, CatBoost's prediction as ``[N]`` while it returns
``[N, 1]``), which onnxruntime warns about on every call; the declarations are set to what the graph returns.

Native files need no trust (they hold trees, not code): LightGBM ``.txt``, XGBoost ``.json``/``.ubj``,
CatBoost ``.cbm``. Pickles and joblib files load only with ``trust_pickle``, behind the allow-list of
:mod:`~slipstream.importers.pickle_scan`, which names exactly the wrapper and booster classes needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Unpack

import numpy as np
import onnx

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_file
from slipstream.errors import ConversionError, InvalidModelError, MissingDependencyError
from slipstream.importers.finish import ImportJob, finish_import
from slipstream.importers.framing import Framing, ImportFraming
from slipstream.importers.parity import Reference

Library = Literal["lightgbm", "xgboost", "catboost"]
LIBRARIES: tuple[Library, ...] = ("lightgbm", "xgboost", "catboost")
NATIVE_SUFFIXES: dict[str, Library] = {".txt": "lightgbm", ".json": "xgboost", ".ubj": "xgboost", ".cbm": "catboost"}
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib"})
STEP_NAME = "import.boosting@1"
INPUT_NAME = "input"
LABEL, PROBABILITIES, VALUE = "label", "probabilities", "variable"
# Trees sum in float32 in onnxruntime and in float64 (LightGBM, CatBoost) or float32 (XGBoost) in the
# library: measured gaps are ~1e-7 on tiny models; 1e-5 is the bar the scikit-learn importer uses too.
PROBABILITY_TOLERANCE = (1e-5, 0.0)
_CLASSIFIER_LOSSES = frozenset({"Logloss", "CrossEntropy", "MultiClass", "MultiClassOneVsAll"})


def boosting_library(model: object) -> Library | None:
    """The boosting library an in-memory model comes from (by its classes' modules; nothing is imported)."""
    roots = {cls.__module__.partition(".")[0] for cls in type(model).__mro__}
    return next((lib for lib in LIBRARIES if lib in roots), None)


def _require(library: Library, package: str | None = None) -> None:
    if importlib.util.find_spec(package or library) is None:
        raise MissingDependencyError(package or library, extra="boosting", feature=f"Converting a {library} model")


@dataclass(frozen=True)
class _Converted:
    """One library's model as a bundle-shaped ONNX graph, with the reference that proves it."""

    proto: onnx.ModelProto
    classifier: bool
    reference: Reference
    reference_name: str
    resolved: dict[str, Any]


def import_boosting(
    source: object,
    output: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    allow_pickle_globals: Iterable[str] = (),
    **framing: Unpack[ImportFraming],
) -> Bundle:
    """Convert a LightGBM, XGBoost or CatBoost model (in memory, a native file, or a trusted pickle)."""
    frame = Framing.begin(framing)
    if not isinstance(source, str | os.PathLike):
        return import_loaded(source, output, frame, None)
    path = Path(source)
    if not path.is_file():
        raise InvalidModelError(f"Expected a boosting model file at '{path}'; there is none.", source=str(path))
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        from slipstream.importers.sklearn import load_estimator

        model = load_estimator(path, trust_pickle=trust_pickle, allow_pickle_globals=allow_pickle_globals)
        return import_loaded(model, output, frame, path)
    library = NATIVE_SUFFIXES.get(suffix)
    if library is None:
        raise ConversionError(
            f"Cannot tell which boosting library wrote '{path}' from its suffix '{suffix}'; expected one of "
            f"{', '.join(sorted(NATIVE_SUFFIXES))} (native files) or {', '.join(sorted(PICKLE_SUFFIXES))}.",
            source=str(path),
            hint="Save LightGBM with booster.save_model('m.txt'), XGBoost with save_model('m.json'), "
            "CatBoost with save_model('m.cbm').",
        )
    _require(library)
    return import_loaded(_load_native(path, library), output, frame, path)


def _load_native(path: Path, library: Library) -> Any:
    try:
        if library == "lightgbm":
            import lightgbm

            return lightgbm.Booster(model_file=str(path))
        if library == "xgboost":
            import xgboost

            booster = xgboost.Booster()
            booster.load_model(str(path))
            objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
            # The scikit-learn wrapper knows how to turn margins into labels and probabilities; pick it by objective.
            wrapper = xgboost.XGBClassifier() if objective.startswith(("binary:", "multi:")) else xgboost.XGBRegressor()
            wrapper.load_model(str(path))
            return wrapper
        import catboost

        return catboost.CatBoost().load_model(str(path))
    except Exception as exc:  # each library raises its own error type (LightGBMError, XGBoostError, CatBoostError)
        raise InvalidModelError(
            f"'{path}' could not be read as a {library} model ({type(exc).__name__}: {exc}).",
            source=str(path),
            hint=f"Check that the file is a {library} model saved by {library}'s save_model.",
        ) from exc


def import_loaded(model: Any, output: str | os.PathLike[str], frame: Framing, path: Path | None) -> Bundle:
    """The shared tail for a model already in memory (from the caller, a native file, or a pickle)."""
    library = boosting_library(model)
    if library is None:
        raise InvalidModelError(
            f"Expected a LightGBM, XGBoost or CatBoost model; got a {type(model).__name__}.",
            source=str(path) if path else None,
        )
    _require(library)
    label = str(path) if path else None
    if library == "catboost":
        converted = _catboost(model, label)
    else:
        _require(library, "onnxmltools")
        converted = _onnxmltools(model, library, frame.opset, label)
    job = ImportJob(
        framework=library,
        step_name=STEP_NAME,
        default_name=path.stem if path else type(model).__name__.lower(),
        source_path=label,
        source_sha256=sha256_file(path) if path else None,
        resolved={"estimator": type(model).__name__, "zipmap": False, "input_dtype": "float32", **converted.resolved},
        step_config={"opset": frame.opset, "zipmap": False, "classifier": converted.classifier, "library": library},
    )
    return finish_import(
        converted.proto,
        output,
        job,
        frame,
        reference=converted.reference,
        reference_name=converted.reference_name,
        tolerances={"float32": PROBABILITY_TOLERANCE} if converted.classifier else None,
    )


def _n_features(model: Any, library: Library) -> int:
    if library == "lightgbm":
        booster = model if type(model).__name__ == "Booster" else model.booster_
        return int(booster.num_feature())
    n = getattr(model, "n_features_in_", None)
    if n is None and library == "xgboost":
        n = model.num_features() if hasattr(model, "num_features") else model.get_booster().num_features()
    if not isinstance(n, int | np.integer):
        raise InvalidModelError(f"The {type(model).__name__} is not fitted (its feature count is unknown).")
    return int(n)


def _onnxmltools(model: Any, library: Library, opset: int | None, source: str | None) -> _Converted:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    n = _n_features(model, library)
    types = [(INPUT_NAME, FloatTensorType([None, n]))]
    classifier = _is_classifier(model, library)
    try:
        if library == "lightgbm":
            proto = onnxmltools.convert_lightgbm(model, initial_types=types, zipmap=False, target_opset=opset)
        else:
            proto = onnxmltools.convert_xgboost(model, initial_types=types, target_opset=opset)
    except Exception as exc:  # onnxmltools raises RuntimeError, NotImplementedError, AttributeError...
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConversionError(
            f"onnxmltools cannot convert the {library} {type(model).__name__}: {type(exc).__name__}: {first}",
            source=source,
            hint="onnxmltools converts tree boosters with numeric features (classification and regression; "
            "no ranking, no categorical splits, opset ≤ 15); retrain without those, or pass --opset 15.",
        ) from exc
    if library == "lightgbm":
        _float32_thresholds(proto, model if type(model).__name__ == "Booster" else model.booster_)
    names = [o.name for o in proto.graph.output]
    _rename(proto, dict(zip(names, [LABEL, PROBABILITIES] if classifier else [VALUE], strict=False)))
    _shape_io(proto, classifier)
    version = importlib.import_module(library).__version__
    proba = classifier and hasattr(model, "predict_proba")  # a bare LightGBM Booster has predict only
    return _Converted(
        proto=proto,
        classifier=classifier,
        reference=_wrapper_reference(model, library, classifier),
        reference_name=f"{library} {type(model).__name__}.predict" + ("/predict_proba" if proba else ""),
        resolved={"converter": f"onnxmltools {onnxmltools.__version__}", "library": f"{library} {version}"},
    )


def _float32_thresholds(proto: onnx.ModelProto, booster: Any) -> None:
    """Make LightGBM's float64 split thresholds exact for float32 inputs.

    LightGBM compares ``double(x) <= t``; the ONNX tree compares in float32 against ``float32(t)``, which
    rounds to nearest. When it rounds *up* onto a value the data holds (``t`` = 66.61999893 → 66.62, and
    x = 66.62 exists), that row goes left in ONNX and right in LightGBM: a whole leaf off (0.2 on a
    regression measured here). For float32 ``x``, ``x <= t`` is exactly ``x <= t'`` with ``t'`` the largest
    float32 not above ``t``; the thresholds are replaced by that, matched per tree and feature.
    """
    exact: dict[tuple[int, int, float], float] = {}
    for tree_id, tree in enumerate(booster.dump_model()["tree_info"]):
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_feature" not in node or node.get("decision_type") != "<=":
                continue
            t = float(node["threshold"])
            nearest = np.float32(t)
            floor = nearest if float(nearest) <= t else np.nextafter(nearest, np.float32(-np.inf))
            exact[(tree_id, int(node["split_feature"]), float(nearest))] = float(floor)
            stack += [node["left_child"], node["right_child"]]
    for node in proto.graph.node:
        if not node.op_type.startswith("TreeEnsemble"):
            continue
        attrs = {a.name: a for a in node.attribute}
        if "nodes_values" not in attrs or "nodes_modes" not in attrs:
            continue
        trees, features = attrs["nodes_treeids"].ints, attrs["nodes_featureids"].ints
        values, modes = attrs["nodes_values"].floats, attrs["nodes_modes"].strings
        for i, mode in enumerate(modes):
            if mode == b"BRANCH_LEQ":
                values[i] = exact.get((trees[i], features[i], float(np.float32(values[i]))), values[i])


def _is_classifier(model: Any, library: Library) -> bool:
    if library == "lightgbm" and type(model).__name__ == "Booster":
        objective = str(model.dump_model(num_iteration=0).get("objective", ""))
        return objective.startswith(("binary", "multiclass", "cross_entropy"))
    if library == "catboost":
        return str(model.get_all_params().get("loss_function", "")).split(":")[0] in _CLASSIFIER_LOSSES
    return hasattr(model, "predict_proba")


def _wrapper_reference(model: Any, library: Library, classifier: bool) -> Reference:
    """The library's own predictions, keyed by the bundle's output names."""
    raw_booster = library == "lightgbm" and type(model).__name__ == "Booster"

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(feeds[INPUT_NAME], dtype=np.float32)
        if not classifier:
            return {VALUE: np.asarray(model.predict(x), dtype=np.float32).reshape(len(x), 1)}
        if raw_booster:  # a bare LightGBM Booster predicts probabilities (binary: of the positive class only)
            p = np.asarray(model.predict(x), dtype=np.float64)
            proba = np.stack([1 - p, p], axis=1) if p.ndim == 1 else p
            return {LABEL: proba.argmax(axis=1).astype(np.int64), PROBABILITIES: proba.astype(np.float32)}
        return {LABEL: np.asarray(model.predict(x)), PROBABILITIES: np.asarray(model.predict_proba(x), np.float32)}

    return run


def _catboost(model: Any, source: str | None) -> _Converted:
    import catboost

    cat_features = model.get_cat_feature_indices() if hasattr(model, "get_cat_feature_indices") else []
    if cat_features:
        raise ConversionError(
            f"The CatBoost model has categorical features (indices {list(cat_features)}); CatBoost's ONNX "
            "exporter supports numeric features only.",
            source=source,
            hint="Encode those columns as numbers before training (e.g. ordinal codes), then convert.",
        )
    classifier = _is_classifier(model, "catboost")
    with tempfile.TemporaryDirectory(prefix="slipstream-catboost-") as tmp:
        target = Path(tmp) / "model.onnx"
        try:
            model.save_model(str(target), format="onnx")
        except Exception as exc:  # CatBoostError for models its exporter cannot write
            raise ConversionError(
                f"CatBoost cannot export the {type(model).__name__} to ONNX: {type(exc).__name__}: {exc}",
                source=source,
                hint="CatBoost exports numeric-feature classifiers and regressors; see its ONNX export docs.",
            ) from exc
        proto = onnx.load(str(target))
    _rename(proto, {proto.graph.input[0].name: INPUT_NAME})
    if classifier:
        classes = getattr(model, "classes_", None)
        _drop_zipmap(proto, len(classes) if classes is not None and len(classes) else None)
        _rename(proto, dict(zip([o.name for o in proto.graph.output], [LABEL, PROBABILITIES], strict=False)))
    else:
        _rename(proto, {proto.graph.output[0].name: VALUE})
    _shape_io(proto, classifier)

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(feeds[INPUT_NAME], dtype=np.float32)
        if not classifier:
            return {VALUE: np.asarray(model.predict(x), dtype=np.float32).reshape(len(x), 1)}
        proba = np.asarray(model.predict(x, prediction_type="Probability"), dtype=np.float32)
        labels = np.asarray(model.predict(x, prediction_type="Class")).reshape(len(x))
        return {LABEL: labels, PROBABILITIES: proba}

    return _Converted(
        proto=proto,
        classifier=classifier,
        reference=run,
        reference_name=f"catboost {type(model).__name__}.predict" + ("(Class/Probability)" if classifier else ""),
        resolved={"converter": f"catboost {catboost.__version__} save_model(format='onnx')"},
    )


def _drop_zipmap(proto: onnx.ModelProto, classes: int | None) -> None:
    """Cut a ZipMap off the graph: its input tensor (the probabilities) becomes the graph output instead."""
    graph = proto.graph
    for node in list(graph.node):
        if node.op_type != "ZipMap":
            continue
        tensor, mapped = node.input[0], node.output[0]
        graph.node.remove(node)
        for out in graph.output:
            if out.name == mapped:
                out.CopyFrom(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, ["batch", classes]))


def _rename(proto: onnx.ModelProto, names: Mapping[str, str]) -> None:
    """Rename graph inputs/outputs (and every node reference to them) to the bundle's names."""
    graph = proto.graph

    def rename(name: str) -> str:
        return names.get(name, name)

    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for info in (*graph.input, *graph.output):
        info.name = rename(info.name)


def _shape_io(proto: onnx.ModelProto, classifier: bool) -> None:
    """Declare the shapes the graph really returns (see the module docstring), batch named ``batch``."""
    graph = proto.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = "batch"
    for out in graph.output:
        tensor = out.type.tensor_type
        shape: list[str | int | None] = ["batch"]
        if out.name == PROBABILITIES:
            old = tensor.shape.dim
            shape.append(old[1].dim_value if len(old) > 1 and old[1].HasField("dim_value") else None)
        elif out.name == VALUE:
            shape.append(1)
        elif out.name != LABEL or not classifier:
            continue
        tensor.shape.Clear()
        for d in shape:
            dim = tensor.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif isinstance(d, str):
                dim.dim_param = d
