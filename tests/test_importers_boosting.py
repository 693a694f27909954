"""LightGBM, XGBoost and CatBoost → bundle: native files and pickles, classifiers and regressors, with parity.

Tiny real models (5 trees, depth ≤ 3) trained on scikit-learn's wine (3 classes) and breast-cancer data;
the parity proof runs on held-out rows of the same data (``sample=``), so the trees' splits are exercised,
not random noise that lands every row in one leaf.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import catboost
import joblib
import lightgbm
import numpy as np
import onnxmltools  # noqa: F401  (the converter the extra brings: missing, this module fails to import, loudly)
import pytest
import xgboost
from sklearn.datasets import load_breast_cancer, load_wine

import slipstream
from slipstream.artifact import Bundle
from slipstream.errors import ConversionError, MissingDependencyError, UntrustedPickleError
from slipstream.importers.sklearn import import_sklearn
from slipstream.runtime import Engine

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


def _split(x: np.ndarray, y: np.ndarray) -> Data:
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    cut = int(len(x) * 0.7)
    return x[:cut], y[:cut], x[cut:], y[cut:]


@pytest.fixture(scope="session")
def wine() -> Data:
    return _split(*load_wine(return_X_y=True))


@pytest.fixture(scope="session")
def cancer() -> Data:
    return _split(*load_breast_cancer(return_X_y=True))


# A regressor target with real spread: the mean radius (column 0) predicted from the other 29 columns.
def _regression(data: Data) -> Data:
    x_train, _, x_test, _ = data
    return x_train[:, 1:], x_train[:, 0].astype(np.float64), x_test[:, 1:], x_test[:, 0].astype(np.float64)


def _lgb(kind: str) -> Any:
    cls = lightgbm.LGBMClassifier if kind == "classifier" else lightgbm.LGBMRegressor
    return cls(n_estimators=5, num_leaves=8, min_child_samples=5, verbose=-1, n_jobs=1)


def _xgb(kind: str) -> Any:
    cls = xgboost.XGBClassifier if kind == "classifier" else xgboost.XGBRegressor
    return cls(n_estimators=5, max_depth=3, n_jobs=1)


def _cb(kind: str) -> Any:
    cls = catboost.CatBoostClassifier if kind == "classifier" else catboost.CatBoostRegressor
    return cls(iterations=5, depth=3, verbose=0, thread_count=1, allow_writing_files=False)


FACTORIES: dict[str, Callable[[str], Any]] = {"lightgbm": _lgb, "xgboost": _xgb, "catboost": _cb}


def _native(library: str, model: Any, folder: Path) -> Path:
    """The library's own file format (no pickle)."""
    if library == "lightgbm":
        path = folder / "model.txt"
        model.booster_.save_model(str(path))
    elif library == "xgboost":
        path = folder / "model.json"
        model.save_model(str(path))
    else:
        path = folder / "model.cbm"
        model.save_model(str(path))
    return path


def _fit(library: str, kind: str, wine: Data, cancer: Data) -> tuple[Any, Data]:
    data = wine if kind == "classifier" else _regression(cancer)
    model = FACTORIES[library](kind).fit(data[0], data[1])
    return model, data


def _assert_parity(bundle: Bundle, name: str) -> None:
    """The proof ran on the held-out rows and passed; its max error is printed (``-s``) for the report."""
    parity = bundle.manifest.parity
    assert parity is not None and parity.status == "passed" and parity.data == "sample" and parity.informative
    worst = max(o.max_abs_error for case in parity.cases for o in case.outputs)
    print(f"parity max abs error {name}: {worst:.3g}")
    assert worst < 1e-4


def _check_served(bundle: Bundle, model: Any, kind: str, x: np.ndarray, library: str, native: bool) -> None:
    """The bundle answers like the library on held-out rows, in the one output layout of every library."""
    out = Engine(bundle).run({"input": x})
    if kind == "classifier":
        assert set(out) == {"label", "probabilities"}
        assert out["probabilities"].shape == (len(x), 3)
        if library == "lightgbm" and native:  # a bare Booster: probabilities only, labels are their argmax
            want = np.asarray(model.booster_.predict(x))
        else:
            want = np.asarray(model.predict_proba(x))
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-5)
        np.testing.assert_array_equal(out["label"].reshape(-1), want.argmax(axis=1))
    else:
        assert set(out) == {"variable"} and out["variable"].shape == (len(x), 1)
        np.testing.assert_allclose(out["variable"][:, 0], model.predict(x), rtol=1e-5, atol=1e-4)
    specs = {s.name: s for s in bundle.manifest.outputs}
    assert all(s.shape[0] == "batch" for s in specs.values())


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
@pytest.mark.parametrize("library", ["lightgbm", "xgboost", "catboost"])
def test_native_file_converts_with_parity(
    library: str, kind: str, wine: Data, cancer: Data, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model, data = _fit(library, kind, wine, cancer)
    source = _native(library, model, tmp_path)
    bundle = slipstream.convert(source, tmp_path / "bundle", sample={"input": data[2]})
    assert bundle.manifest.source.framework == library
    assert bundle.manifest.source.sha256 is not None  # a file: its digest is recorded
    assert bundle.manifest.resolved["zipmap"] is False
    _assert_parity(bundle, request.node.name)
    _check_served(bundle, model, kind, data[2], library, native=True)


@pytest.mark.parametrize("dump", ["pickle", "joblib"])
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
@pytest.mark.parametrize("library", ["lightgbm", "xgboost", "catboost"])
def test_pickled_wrapper_converts_with_parity(
    library: str, kind: str, dump: str, wine: Data, cancer: Data, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model, data = _fit(library, kind, wine, cancer)
    path = tmp_path / ("model.pkl" if dump == "pickle" else "model.joblib")
    if dump == "pickle":
        path.write_bytes(pickle.dumps(model))
    else:
        joblib.dump(model, path)
    with pytest.raises(UntrustedPickleError):
        slipstream.convert(path, tmp_path / "refused", sample={"input": data[2]})
    bundle = slipstream.convert(path, tmp_path / "bundle", trust_pickle=True, sample={"input": data[2]})
    assert bundle.manifest.source.framework == library
    assert bundle.manifest.resolved["estimator"] == type(model).__name__
    _assert_parity(bundle, request.node.name)
    _check_served(bundle, model, kind, data[2], library, native=False)


@pytest.mark.parametrize("library", ["lightgbm", "xgboost", "catboost"])
def test_in_memory_model_converts(library: str, wine: Data, cancer: Data, tmp_path: Path) -> None:
    """An in-memory wrapper goes to the boosting importer, though LightGBM/XGBoost subclass scikit-learn's bases."""
    model, data = _fit(library, "classifier", wine, cancer)
    bundle = slipstream.convert(model, tmp_path / "b", sample={"input": data[2]})
    assert bundle.manifest.source.framework == library
    assert [s.name for s in bundle.manifest.inputs] == ["input"]
    # also when handed to the scikit-learn importer directly (it is what a .pkl dispatches to)
    again = import_sklearn(model, tmp_path / "b2", sample={"input": data[2]})
    assert again.manifest.source.framework == library


def test_binary_lightgbm_booster_gets_two_probability_columns(cancer: Data, tmp_path: Path) -> None:
    """A bare binary Booster predicts P(positive) only; the bundle answers both columns, and labels agree."""
    x_train, y_train, x_test, _ = cancer
    booster = _lgb("classifier").fit(x_train, y_train).booster_
    path = tmp_path / "binary.txt"
    booster.save_model(str(path))
    bundle = slipstream.convert(path, tmp_path / "b", sample={"input": x_test})
    out = Engine(bundle).run({"input": x_test})
    p = booster.predict(x_test)
    np.testing.assert_allclose(out["probabilities"][:, 1], p, atol=1e-5)
    np.testing.assert_array_equal(out["label"], (p > 0.5).astype(np.int64))


def test_pickle_allow_list_admits_only_the_named_boosting_classes(tmp_path: Path) -> None:
    """A trusted pickle that reaches into the boosting packages for anything else is still refused."""
    path = tmp_path / "evil.pkl"
    # lightgbm.basic._load_lib is a function of an allowed package: not on the list, so never imported.
    path.write_bytes(b"\x80\x02clightgbm.basic\n_load_lib\n)R.")
    with pytest.raises(UntrustedPickleError, match=r"lightgbm\.basic\._load_lib"):
        slipstream.convert(path, tmp_path / "b", trust_pickle=True)


def test_missing_library_says_install_the_extra(wine: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle of a library that is not installed asks for slipstream[boosting], not another scikit-learn."""
    model, _ = _fit("xgboost", "classifier", wine, wine)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    # As if xgboost were not installed: the interpreter's module finder answers that it has no such package.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgboost" else real(name, *a))
    with pytest.raises(MissingDependencyError) as info:
        slipstream.convert(path, tmp_path / "b", trust_pickle=True)
    assert info.value.extra == "boosting" and "slipstream[boosting]" in str(info.value.hint)
    assert "scikit-learn version" not in str(info.value)


def test_categorical_catboost_is_refused_by_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.integers(0, 3, 200).astype(str), rng.normal(size=200).astype(str)], axis=1).astype(object)
    x[:, 1] = x[:, 1].astype(float)
    y = rng.integers(0, 2, 200)
    model = _cb("classifier").fit(x, y, cat_features=[0])
    with pytest.raises(ConversionError, match="categorical features"):
        slipstream.convert(model, tmp_path / "b")
