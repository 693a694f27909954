"""scikit-learn → bundle through skl2onnx, on the real breast-cancer data, with the parity proof."""

from __future__ import annotations

import copy
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_breast_cancer
from sklearn.decomposition import PCA
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    IsolationForest,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, SplineTransformer, StandardScaler
from sklearn.svm import SVC, SVR, OneClassSVM
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

import slipstream
from slipstream.artifact import Bundle
from slipstream.cli import app
from slipstream.errors import InvalidModelError, ParityError, UnsupportedOpError, UntrustedPickleError
from slipstream.importers.sklearn import import_sklearn, load_estimator
from slipstream.runtime import Engine

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
runner = CliRunner()


@pytest.fixture(scope="session")
def cancer() -> Data:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0)
    return x_train, x_test, y_train, y_test


def _models() -> dict[str, Any]:
    return {
        "logistic": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        # An odd number of trees: with 40, one test row gets exactly 0.5/0.5 (see the tie test below).
        "forest": RandomForestClassifier(n_estimators=41, max_depth=8, random_state=0),
        "boosting": GradientBoostingClassifier(n_estimators=40, random_state=0),
    }


@pytest.fixture(scope="session")
def fitted(cancer: Data) -> dict[str, Any]:
    x_train, _, y_train, _ = cancer
    return {name: model.fit(x_train, y_train) for name, model in _models().items()}


@pytest.fixture(scope="session")
def bundles(fitted: dict[str, Any], cancer: Data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("sklearn")
    x_test = cancer[1]
    return {name: slipstream.convert(m, root / name, sample={"input": x_test}) for name, m in fitted.items()}


@pytest.mark.parametrize("name", ["logistic", "forest", "boosting"])
def test_classifiers_match_predict_and_predict_proba(
    name: str, fitted: dict[str, Any], bundles: dict[str, Bundle], cancer: Data
) -> None:
    model, bundle, x_test = fitted[name], bundles[name], cancer[1]
    m = bundle.manifest
    assert m.source.framework == "sklearn" and [e.step for e in m.lineage] == ["import.sklearn@1"]
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("input", "float32", ("batch", 30))]
    assert [(s.name, s.dtype, s.shape) for s in m.outputs] == [
        ("label", "int64", ("batch",)), ("probabilities", "float32", ("batch", 2)),
    ]  # fmt: skip
    assert m.resolved["zipmap"] is False
    assert m.parity is not None and m.parity.status == "passed" and m.parity.data == "sample"
    assert "predict_proba" in m.parity.reference
    for case in m.parity.cases:
        label, proba = case.outputs
        assert label.exact and label.passed
        assert proba.atol == 1e-5 and proba.max_abs_error <= 1e-5

    got = Engine(bundle).run({"input": x_test})
    np.testing.assert_array_equal(got["label"], model.predict(x_test))
    assert np.abs(got["probabilities"] - model.predict_proba(x_test)).max() <= 1e-5
    assert (got["label"] == cancer[3]).mean() > 0.9  # a real model on real data


def test_generated_inputs_when_no_sample_is_given(fitted: dict[str, Any], tmp_path: Path) -> None:
    bundle = slipstream.convert(fitted["forest"], tmp_path / "b")
    assert bundle.manifest.parity is not None and bundle.manifest.parity.data == "generated"
    assert [c.batch for c in bundle.manifest.parity.cases] == [1, 3]


def test_a_regressor_gives_one_float_output(cancer: Data, tmp_path: Path) -> None:
    x_train, x_test, y_train, _ = cancer
    model = LinearRegression().fit(x_train, y_train.astype(np.float32))
    bundle = import_sklearn(model, tmp_path / "b", sample={"input": x_test})
    assert [s.name for s in bundle.manifest.outputs] == ["variable"]
    got = Engine(bundle).run({"input": x_test})["variable"]
    np.testing.assert_allclose(got[:, 0], model.predict(x_test), atol=1e-3)


def test_a_pickle_file_loads_only_when_trusted(fitted: dict[str, Any], cancer: Data, tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump(fitted["logistic"], path)
    with pytest.raises(UntrustedPickleError) as info:
        slipstream.convert(path, tmp_path / "b")
    assert "runs arbitrary Python code" in info.value.message and "--trust-pickle" in (info.value.hint or "")
    assert not (tmp_path / "b").exists()
    bundle = slipstream.convert(path, tmp_path / "b", trust_pickle=True, sample={"input": cancer[1]})
    assert bundle.manifest.source.path == str(path) and bundle.manifest.name == "model"
    assert bundle.manifest.source.sha256 is not None


def test_a_tie_broken_the_other_way_is_caught(cancer: Data, tmp_path: Path) -> None:
    """40 trees vote 0.5/0.5 on one test row: sklearn says class 0, float32 ONNX sums to 0.49999994 → class 1."""
    x_train, x_test, y_train, _ = cancer
    forest = RandomForestClassifier(n_estimators=40, max_depth=8, random_state=0).fit(x_train, y_train)
    with pytest.raises(ParityError) as info:
        slipstream.convert(forest, tmp_path / "b", sample={"input": x_test})
    assert info.value.mismatches == ["[batch=32] output 'label': values differ"]
    assert not (tmp_path / "b").exists()


def test_an_unfitted_estimator_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="not fitted"):
        slipstream.convert(LogisticRegression(), tmp_path / "b")


def test_sample_data_with_labels_is_accepted(fitted: dict[str, Any], cancer: Data, tmp_path: Path) -> None:
    """The evaluation .npz (inputs + labels) doubles as parity sample data; its labels are not an input."""
    _, x_test, _, y_test = cancer
    np.savez(tmp_path / "eval.npz", input=x_test, labels=y_test)
    bundle = slipstream.convert(fitted["logistic"], tmp_path / "b", sample=tmp_path / "eval.npz")
    assert bundle.manifest.parity is not None and bundle.manifest.parity.data == "sample"


# -- the estimators users bring, on small data ---------------------------------------------------------------

ESTIMATORS: dict[str, Any] = {
    "logistic": lambda: LogisticRegression(max_iter=1000),
    "random-forest": lambda: RandomForestClassifier(n_estimators=9, random_state=0),
    "extra-trees": lambda: ExtraTreesClassifier(n_estimators=9, random_state=0),
    "gradient-boosting": lambda: GradientBoostingClassifier(n_estimators=10, random_state=0),
    "hist-gradient-boosting": lambda: HistGradientBoostingClassifier(max_iter=10, random_state=0),
    "svc": lambda: SVC(),  # label and decision_function (probability=True is deprecated in scikit-learn 1.9)
    "calibrated-svc": lambda: CalibratedClassifierCV(SVC(), ensemble=False),
    "knn": lambda: KNeighborsClassifier(),
    "mlp": lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0),
    "naive-bayes": lambda: GaussianNB(),
    "ridge": lambda: Ridge(),
    "hist-gradient-boosting-regressor": lambda: HistGradientBoostingRegressor(max_iter=10, random_state=0),
    "random-forest-regressor": lambda: RandomForestRegressor(n_estimators=9, random_state=0),
    "gradient-boosting-regressor": lambda: GradientBoostingRegressor(n_estimators=10, random_state=0),
    "svr": lambda: SVR(),
    "knn-regressor": lambda: KNeighborsRegressor(),
    "isolation-forest": lambda: IsolationForest(n_estimators=10, random_state=0),
    "one-class-svm": lambda: OneClassSVM(gamma="scale"),
}


@pytest.fixture(scope="session")
def small(cancer: Data) -> Data:
    """Eight standardized features: small enough that every estimator fits in well under a second."""
    x_train, x_test, y_train, y_test = cancer
    scaler = StandardScaler().fit(x_train[:, :8])
    return (
        scaler.transform(x_train[:, :8]).astype(np.float32),
        scaler.transform(x_test[:40, :8]).astype(np.float32),
        y_train,
        y_test[:40],
    )


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_common_estimators_convert_with_parity(name: str, small: Data, tmp_path: Path) -> None:
    x_train, x_test, y_train, _ = small
    model = ESTIMATORS[name]()
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a short fit is enough to prove conversion
        model.fit(x_train, None if name in ("isolation-forest", "one-class-svm") else y_train)
    bundle = import_sklearn(model, tmp_path / "b", sample={"input": x_test})
    m = bundle.manifest
    assert m.parity is not None and m.parity.status == "passed" and m.parity.informative
    assert m.resolved["target_opsets"] == {"ai.onnx": 22, "ai.onnx.ml": 3}
    got = Engine(bundle).run({"input": x_test})
    if hasattr(model, "predict_proba") or name == "svc":
        np.testing.assert_array_equal(got["label"], model.predict(x_test))
    elif hasattr(model, "score_samples"):  # outlier detectors: the label and the decision_function score
        np.testing.assert_array_equal(got["label"].reshape(-1), model.predict(x_test))
        np.testing.assert_allclose(got["scores"].reshape(-1), model.decision_function(x_test), atol=1e-4)
    else:
        np.testing.assert_allclose(got["variable"].reshape(-1), model.predict(x_test), rtol=1e-4, atol=1e-4)


def test_isolation_forest_gets_the_ml_opset_it_needs(small: Data, tmp_path: Path) -> None:
    """IsolationForest emits ai.onnx.ml 3 operators; a bare target_opset=N made skl2onnx refuse it."""
    model = IsolationForest(n_estimators=10, random_state=0).fit(small[0])
    bundle = import_sklearn(model, tmp_path / "b", sample={"input": small[1]})
    assert bundle.manifest.resolved["opsets"] == {"ai.onnx": 22, "ai.onnx.ml": 3}
    assert [o.name for o in bundle.manifest.outputs] == ["label", "scores"]


def test_an_older_opset_is_paired_with_its_ml_opset(small: Data, tmp_path: Path) -> None:
    model = RandomForestClassifier(n_estimators=5, random_state=0).fit(small[0], small[2])
    bundle = import_sklearn(model, tmp_path / "b", opset=15, sample={"input": small[1]})
    assert bundle.manifest.resolved["target_opsets"] == {"ai.onnx": 15, "ai.onnx.ml": 2}


def test_why_hist_gradient_boosting_needs_the_wrapped_converter(small: Data) -> None:
    """The root cause, pinned: skl2onnx 1.20 mixes a bool into an int attribute list that onnx 1.23 refuses.

    When this starts passing conversion, the upstream bug is fixed and sklearn_convert._hgb_converters can go.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model = HistGradientBoostingClassifier(max_iter=3, random_state=0)
    with threadpool_limits(1):
        model.fit(small[0], small[2])
    with pytest.raises(ValueError) as info:
        convert_sklearn(model, initial_types=[("input", FloatTensorType([None, 8]))], target_opset=22)
    assert "Expected an int, got a boolean" in str(info.value.__cause__)


def test_a_step_without_a_converter_is_refused_by_name(small: Data, tmp_path: Path) -> None:
    model = make_pipeline(SplineTransformer(), LogisticRegression()).fit(small[0], small[2])
    with pytest.raises(UnsupportedOpError) as info:
        import_sklearn(model, tmp_path / "b")
    assert info.value.op == "sklearn.preprocessing.SplineTransformer"
    assert "skl2onnx 1.20.0 has no converter for sklearn.preprocessing.SplineTransformer" in info.value.message
    assert "Pipeline → splinetransformer" in info.value.message and "estimator classes" in info.value.message
    assert "update_registered_converter" in (info.value.hint or "") and not (tmp_path / "b").exists()


def test_a_child_without_a_converter_inside_a_meta_estimator_is_named(small: Data, tmp_path: Path) -> None:
    model = OneVsRestClassifier(make_pipeline(SplineTransformer(), LogisticRegression())).fit(small[0], small[2])
    with pytest.raises(UnsupportedOpError) as info:
        import_sklearn(model, tmp_path / "b")
    assert info.value.op == "sklearn.preprocessing.SplineTransformer"
    assert "Every step must" not in (info.value.hint or "")


def test_a_class_from_a_package_that_is_not_installed_says_install_it(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(b"cnot_installed_pkg.models\nBooster\n.")
    with pytest.raises(InvalidModelError) as info:
        load_estimator(path, trust_pickle=True, allow_pickle_globals=["not_installed_pkg.models.Booster"])
    assert "the package 'not_installed_pkg', which is not installed" in info.value.message
    assert "pip install not_installed_pkg" in (info.value.hint or "")
    assert "scikit-learn version" not in (info.value.hint or "")


# -- pickles are scanned even when trusted ----------------------------------------------------------------


class Evil:
    """What an attacker ships: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux


def _dump(obj: Any, path: Path, how: str) -> Path:
    if how == "joblib":
        joblib.dump(obj, path)
    elif how == "joblib-compressed":
        joblib.dump(obj, path, compress=3)
    else:
        with path.open("wb") as f:
            pickle.dump(obj, f, protocol=int(how.removeprefix("pickle-")))
    return path


@pytest.mark.parametrize("how", ["joblib", "joblib-compressed", "pickle-0", "pickle-2", "pickle-5"])
def test_a_malicious_pickle_is_refused_even_when_trusted(how: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = _dump(Evil(marker), tmp_path / "evil.joblib", how)
    with pytest.raises(UntrustedPickleError) as info:
        slipstream.convert(path, tmp_path / "b", trust_pickle=True)
    assert SYSTEM in info.value.message and str(path) in info.value.message
    assert "nothing off the allow-list was imported or run" in info.value.message
    assert "do not load this file" in (info.value.hint or "")  # and no invitation to allow os.system
    assert not marker.exists() and not (tmp_path / "b").exists()


def test_a_malicious_pickle_is_refused_through_the_cli(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = _dump(Evil(marker), tmp_path / "evil.joblib", "joblib")
    result = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "b"), "--trust-pickle"])
    assert result.exit_code == 1
    assert SYSTEM in result.stderr and "evil.joblib" in result.stderr
    assert not marker.exists() and not (tmp_path / "b").exists()


def test_a_payload_hidden_inside_a_real_pipeline_is_refused(fitted: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    model = copy.deepcopy(fitted["logistic"])
    model.steps[0][1].note = Evil(marker)  # an attribute of a fitted StandardScaler
    objects = np.array([Evil(marker)], dtype=object)  # joblib pickles an object array as a nested stream
    for name, obj in (("in-pipeline.joblib", model), ("in-array.joblib", {"model": fitted["logistic"], "x": objects})):
        with pytest.raises(UntrustedPickleError, match=re.escape(SYSTEM)):
            load_estimator(_dump(obj, tmp_path / name, "joblib"), trust_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("stream", "named"),
    [
        (b"cbuiltins\neval\n(S'1'\ntR.", "builtins.eval"),  # protocol 0: GLOBAL + REDUCE
        (b"(c__builtin__\neval\nS'1'\ni.", "builtins.eval"),  # INST, with the Python 2 module name mapped
        (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x05numpy\x8c\x04load\x93.", "numpy.load"),  # a function
        (b"cnumpy\nmemmap\n.", "numpy.memmap"),  # an ndarray subclass that opens files
        (b"csklearn.datasets\nfetch_openml\n.", "sklearn.datasets.fetch_openml"),  # not a model part
        (b"csklearn.base\nos.system\n.", "sklearn.base.os.system"),  # a dotted path to a re-export
    ],
)
def test_each_way_to_name_a_global_is_checked(stream: bytes, named: str, tmp_path: Path) -> None:
    path = tmp_path / "crafted.pkl"
    path.write_bytes(stream)
    with pytest.raises(UntrustedPickleError, match=re.escape(named)):
        load_estimator(path, trust_pickle=True)


def test_a_module_off_the_list_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "IMPORTED"
    (tmp_path / "side_effect_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nthing = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "crafted.pkl").write_bytes(b"cside_effect_mod\nthing\n.")
    with pytest.raises(UntrustedPickleError, match=r"side_effect_mod\.thing"):
        load_estimator(tmp_path / "crafted.pkl", trust_pickle=True)
    assert not marker.exists() and "side_effect_mod" not in sys.modules


@pytest.mark.parametrize("how", ["joblib", "joblib-compressed", "pickle-2", "pickle-5"])
@pytest.mark.parametrize("name", ["logistic", "forest", "boosting"])
def test_real_models_load_through_the_allow_list(
    name: str, how: str, fitted: dict[str, Any], cancer: Data, tmp_path: Path
) -> None:
    model = fitted[name]
    loaded = load_estimator(_dump(model, tmp_path / "model.joblib", how), trust_pickle=True)
    np.testing.assert_array_equal(loaded.predict_proba(cancer[1]), model.predict_proba(cancer[1]))


def test_more_estimator_kinds_load_through_the_allow_list(cancer: Data, tmp_path: Path) -> None:
    x_train, x_test, y_train, _ = cancer
    models = [
        make_pipeline(FunctionTransformer(np.log1p), PCA(5), KNeighborsClassifier()),  # a ufunc, a KD-tree
        HistGradientBoostingClassifier(max_iter=3, early_stopping=False, random_state=np.random.RandomState(0)),
        make_pipeline(StandardScaler(), SVC(kernel="linear")),
        DecisionTreeClassifier(max_depth=3),
    ]
    for i, model in enumerate(models):  # the boosting model brings Cython losses and a RandomState
        with threadpool_limits(1):  # OpenMP threads on a busy machine take seconds for this tiny fit
            model.fit(np.abs(x_train), y_train)
        loaded = load_estimator(_dump(model, tmp_path / f"{i}.joblib", "joblib"), trust_pickle=True)
        np.testing.assert_array_equal(loaded.predict(np.abs(x_test)), model.predict(np.abs(x_test)))


def test_a_name_the_caller_vouches_for_is_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "own_pkg.py").write_text("class Scaler:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "own.pkl"
    path.write_bytes(b"cown_pkg\nScaler\n)\x81.")  # protocol 0 GLOBAL, then NEWOBJ with no arguments
    with pytest.raises(UntrustedPickleError) as info:
        load_estimator(path, trust_pickle=True)
    assert "allow_pickle_globals=['own_pkg.Scaler']" in (info.value.hint or "")
    loaded = load_estimator(path, trust_pickle=True, allow_pickle_globals=["own_pkg.Scaler"])
    assert type(loaded).__name__ == "Scaler"
    monkeypatch.delitem(sys.modules, "own_pkg")


def test_convert_prints_its_parity_summary(fitted: dict[str, Any], cancer: Data, tmp_path: Path) -> None:
    path = tmp_path / "logistic.joblib"
    joblib.dump(fitted["logistic"], path)
    np.savez(tmp_path / "sample.npz", input=cancer[1])
    sample = ["--sample", str(tmp_path / "sample.npz")]  # the name the not-informative warning gives
    result = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "b"), "--trust-pickle", *sample])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps long lines
    summary = r"parity: passed against scikit-learn Pipeline\.predict/predict_proba on 2 sample input sets"
    assert re.search(summary + r" \(batch=1; batch=32\); max abs error [0-9.e-]+, max rel error [0-9.e-]+", text)
    assert "not informative" not in text and "warning" not in text


def test_a_constant_model_is_reported_not_informative_in_the_cli(cancer: Data, tmp_path: Path) -> None:
    """A regressor fitted on a constant target outputs that constant for any input: parity cannot tell."""
    x_train = cancer[0]
    model = LinearRegression().fit(x_train, np.full(len(x_train), 3.0))
    path = tmp_path / "flat.joblib"
    joblib.dump(model, path)
    result = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "b"), "--trust-pickle"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "parity: passed, not informative" in text and "on 2 generated input sets" in text
    assert re.search(r"warning: parity is not informative: output '\w+' was the same for every input", text)
    assert "Pass real inputs with --sample" in text
    parity = Bundle.load(tmp_path / "b").manifest.parity
    assert parity is not None and not parity.informative and len(parity.warnings) == 1
