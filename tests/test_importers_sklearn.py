"""scikit-learn → bundle through skl2onnx, on the real breast-cancer data, with the parity proof."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import slipstream
from slipstream.artifact import Bundle
from slipstream.errors import InvalidModelError, ParityError, UntrustedPickleError
from slipstream.importers.sklearn import import_sklearn
from slipstream.runtime import Engine

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


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
    bundle = import_sklearn(model, tmp_path / "b", sample_data={"input": x_test})
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
