"""A scikit-learn pipeline fitted on a DataFrame: one typed input per column, served, and called by tritonclient.

The must-show of issue 19: two text columns and two numeric ones go through a ColumnTransformer
(OneHotEncoder, StandardScaler) into a HistGradientBoostingClassifier; the bundle takes one OIP input per
column, and an unchanged ``tritonclient.http`` call with BYTES inputs gets scikit-learn's own predictions.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

import slipstream
from slipstream.artifact import Bundle
from slipstream.cli import app
from slipstream.errors import ConfigError, InvalidModelError
from slipstream.runtime import Engine
from slipstream.serve.settings import ServeSettings
from tests.serve_support import ServerThread

CITIES = ["lyon", "paris", "nice", "lille", "brest"]
PLANS = ["free", "pro", "team"]


def _customers(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "city": rng.choice(CITIES, n),
            "plan": rng.choice(PLANS, n),
            "age": rng.integers(18, 80, n),
            "spend": rng.gamma(2.0, 30.0, n),
        }
    )


def _churned(df: pd.DataFrame) -> np.ndarray:
    score = (df["plan"] == "free") * 1.0 + (df["city"].isin(["lille", "brest"])) * 0.8 - df["spend"] / 80
    return (score + (df["age"] < 30) * 0.5 > 0.2).to_numpy().astype(np.int64)


def _pipeline(estimator: Any) -> Pipeline:
    columns = ColumnTransformer(
        [
            ("text", OneHotEncoder(handle_unknown="ignore"), ["city", "plan"]),
            ("numbers", StandardScaler(), ["age", "spend"]),
        ]
    )
    return Pipeline([("columns", columns), ("model", estimator)])


@pytest.fixture(scope="module")
def rows() -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    train = _customers(400, seed=0)
    return train, _churned(train), _customers(64, seed=1)


@pytest.fixture(scope="module")
def churn(rows: tuple[pd.DataFrame, np.ndarray, pd.DataFrame]) -> Pipeline:
    train, y, _ = rows
    with threadpool_limits(1):  # OpenMP threads on a busy machine take seconds for this small fit
        return _pipeline(HistGradientBoostingClassifier(max_iter=30, random_state=0)).fit(train, y)


@pytest.fixture(scope="module")
def bundle(churn: Pipeline, rows: tuple[pd.DataFrame, np.ndarray, pd.DataFrame], tmp_path_factory: Any) -> Bundle:
    return slipstream.convert(churn, tmp_path_factory.mktemp("df") / "churn", sample=rows[2])


def test_each_column_is_its_own_typed_input(bundle: Bundle) -> None:
    m = bundle.manifest
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [
        ("city", "string", ("batch", 1)), ("plan", "string", ("batch", 1)),
        ("age", "int64", ("batch", 1)), ("spend", "float32", ("batch", 1)),
    ]  # fmt: skip
    assert m.resolved["columns"] == {"city": "string", "plan": "string", "age": "int64", "spend": "float32"}
    assert m.parity is not None and m.parity.status == "passed" and m.parity.data == "sample"
    assert m.parity.informative and [c.batch for c in m.parity.cases] == [1, 32]


def test_both_opsets_are_chosen_and_recorded(bundle: Bundle) -> None:
    resolved = bundle.manifest.resolved
    assert resolved["target_opsets"] == {"ai.onnx": 22, "ai.onnx.ml": 3}
    opsets = resolved["opsets"]
    assert isinstance(opsets, dict) and "ai.onnx.ml" in opsets and opsets["ai.onnx"] is not None


def test_the_engine_agrees_with_scikit_learn_on_new_rows(bundle: Bundle, churn: Pipeline) -> None:
    rows = _customers(200, seed=7)
    feeds = {
        "city": rows[["city"]].to_numpy().astype(object),
        "plan": rows[["plan"]].to_numpy().astype(object),
        "age": rows[["age"]].to_numpy().astype(np.int64),
        "spend": rows[["spend"]].to_numpy().astype(np.float32),
    }
    got = Engine(bundle).run(feeds)
    np.testing.assert_array_equal(got["label"], churn.predict(rows))
    assert np.abs(got["probabilities"] - churn.predict_proba(rows)).max() <= 1e-5


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_table_file_is_a_sample(suffix: str, churn: Pipeline, rows: Any, tmp_path: Path) -> None:
    path = tmp_path / f"rows{suffix}"
    rows[2].to_parquet(path) if suffix == ".parquet" else rows[2].to_csv(path, index=False)
    bundle = slipstream.convert(churn, tmp_path / "b", sample=path)
    assert bundle.manifest.parity is not None and bundle.manifest.parity.data == "sample"


def test_a_pickled_pipeline_converts_from_the_cli_with_a_parquet_sample(
    churn: Pipeline, rows: Any, tmp_path: Path
) -> None:
    joblib.dump(churn, tmp_path / "churn.joblib")
    rows[2].to_parquet(tmp_path / "rows.parquet")
    args = ["convert", str(tmp_path / "churn.joblib"), "-o", str(tmp_path / "b"), "--trust-pickle"]
    result = CliRunner().invoke(app, [*args, "--sample", str(tmp_path / "rows.parquet")])
    assert result.exit_code == 0, result.output
    manifest = Bundle.load(tmp_path / "b").manifest
    assert [s.name for s in manifest.inputs] == ["city", "plan", "age", "spend"]
    assert manifest.parity is not None and manifest.parity.data == "sample" and manifest.parity.status == "passed"


def test_text_columns_need_real_rows(churn: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"text columns \['city', 'plan'\]") as info:
        slipstream.convert(churn, tmp_path / "b")
    assert "sample=" in (info.value.hint or "")
    assert not (tmp_path / "b").exists()


def test_text_picked_by_position_from_an_object_array_is_refused_with_the_fix(tmp_path: Path) -> None:
    """The issue's "invalid literal for int() ... 'lyon'": now a refusal that says to fit on a DataFrame."""
    train = _customers(100, seed=8)
    x = train[["city", "spend"]].to_numpy(dtype=object)
    columns = ColumnTransformer([("text", OneHotEncoder(), [0]), ("numbers", StandardScaler(), [1])])
    model = Pipeline([("columns", columns), ("model", LogisticRegression())]).fit(x, _churned(train))
    with pytest.raises(InvalidModelError, match="picks text columns by position") as info:
        slipstream.convert(model, tmp_path / "b")
    assert "Fit the pipeline on a pandas DataFrame" in (info.value.hint or "")


def test_column_types_come_from_the_encoders_without_a_sample(churn: Pipeline, tmp_path: Path) -> None:
    bundle = slipstream.convert(churn, tmp_path / "b", skip_parity=True)
    assert [s.dtype for s in bundle.manifest.inputs] == ["string", "string", "float32", "float32"]


def test_numbers_only_and_a_regressor(tmp_path: Path) -> None:
    """Generated parity works when no column is text; an ordinal encoder on integers stays numeric."""
    train = _customers(200, seed=3)[["age", "spend"]]
    columns = ColumnTransformer([("age", OrdinalEncoder(), ["age"]), ("spend", StandardScaler(), ["spend"])])
    model = Pipeline([("columns", columns), ("ridge", Ridge())]).fit(train, train["spend"] * 0.1)
    bundle = slipstream.convert(model, tmp_path / "b", sample=_customers(40, seed=4)[["age", "spend"]])
    assert [(s.name, s.dtype) for s in bundle.manifest.inputs] == [("age", "int64"), ("spend", "float32")]
    assert bundle.manifest.parity is not None and bundle.manifest.parity.status == "passed"


def test_a_plain_model_fitted_on_a_dataframe_takes_one_matrix(tmp_path: Path) -> None:
    """Without a ColumnTransformer, skl2onnx wants one float matrix; a DataFrame sample is stacked into it."""
    train = _customers(200, seed=5)[["age", "spend"]]
    model = LogisticRegression().fit(train, (train["spend"] > 60).to_numpy())
    bundle = slipstream.convert(model, tmp_path / "b", sample=_customers(40, seed=6)[["age", "spend"]])
    assert [(s.name, s.dtype, s.shape) for s in bundle.manifest.inputs] == [("input", "float32", ("batch", 2))]
    assert bundle.manifest.parity is not None and bundle.manifest.parity.data == "sample"


# -- the must-show: an unchanged tritonclient call with BYTES inputs ---------------------------------------


@pytest.fixture(scope="module")
def served(bundle: Bundle, tmp_path_factory: Any) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("df-serve") / "repo"
    shutil.copytree(bundle.path, repo / "churn" / "1")
    with ServerThread(repo, ServeSettings(port=0, access_log=False)) as server:
        yield server


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_with_bytes_columns(binary: bool, served: ServerThread, churn: Pipeline) -> None:
    import tritonclient.http as httpclient

    rows = _customers(25, seed=11)
    client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
    inputs = []
    for name, datatype, values in [
        ("city", "BYTES", rows[["city"]].to_numpy().astype(np.object_)),
        ("plan", "BYTES", rows[["plan"]].to_numpy().astype(np.object_)),
        ("age", "INT64", rows[["age"]].to_numpy().astype(np.int64)),
        ("spend", "FP32", rows[["spend"]].to_numpy().astype(np.float32)),
    ]:
        tensor = httpclient.InferInput(name, list(values.shape), datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    result = client.infer("churn", inputs, model_version="1", outputs=outputs)
    assert client.is_model_ready("churn")
    np.testing.assert_array_equal(result.as_numpy("label"), churn.predict(rows))
    assert np.abs(result.as_numpy("probabilities") - churn.predict_proba(rows)).max() <= 1e-5
    client.close()
