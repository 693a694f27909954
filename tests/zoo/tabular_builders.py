"""Zoo builders for scikit-learn (numeric estimators and pipelines over pandas DataFrames) and gradient boosting
from LightGBM, XGBoost and CatBoost, each fitted in a fraction of a second on generated data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tests.zoo.base import Built, Expected, rng


def _tabular(seed: int, n: int = 200, features: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Separable-ish data: the class is the argmax of three fixed projections plus noise."""
    gen = rng(seed)
    x = gen.standard_normal((n, features)).astype(np.float32)
    y = np.argmax(x @ gen.standard_normal((features, 3)) + 0.3 * gen.standard_normal((n, 3)), axis=1)
    return x, y


def _classifier_expected(model: Any, name: str = "input") -> Expected:
    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        x = np.asarray(feeds[name])
        return [np.asarray(model.predict(x)), np.asarray(model.predict_proba(x), np.float32)]

    return run


def numeric_classifier(make: Callable[[], Any], seed: int) -> Callable[[Path], Built]:
    def build(_: Path) -> Built:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        x, y = _tabular(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a few dozen epochs are enough for a zoo model
            model = make().fit(x, y)
        return Built(model, {}, {"input": x[:3]}, _classifier_expected(model))

    return build


def logistic_regression() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=200)


def random_forest() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=10, max_depth=5, random_state=0)


def sklearn_mlp() -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier((32,), max_iter=50, random_state=0)


def gradient_boosting() -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(n_estimators=10, max_depth=3, random_state=0)


def hist_gboost() -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=15, random_state=0)


def ridge_regression(_: Path) -> Built:
    from sklearn.linear_model import Ridge

    x, _y = _tabular(20)
    model = Ridge().fit(x, x @ np.arange(1, 7, dtype=np.float32))

    def expected(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(model.predict(np.asarray(feeds["input"])), np.float32).reshape(-1, 1)]

    return Built(model, {}, {"input": x[:3]}, expected)


def isolation_forest(_: Path) -> Built:
    """IsolationForest: predict (1 inlier, -1 outlier) and the anomaly score (``score_samples``'s sign flipped
    by skl2onnx: its output is ``decision_function``)."""
    from sklearn.ensemble import IsolationForest

    x, _y = _tabular(21)
    model = IsolationForest(n_estimators=20, random_state=0).fit(x)
    request = np.concatenate([x[:2], np.full((1, x.shape[1]), 6.0, np.float32)])
    # Generated parity inputs are all inliers (predict is constant on them): prove parity on rows with outliers.
    sample = {"input": np.concatenate([x[:30], 4.0 * x[30:40]]).astype(np.float32)}

    def expected(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        rows = np.asarray(feeds["input"])
        return [np.asarray(model.predict(rows)), np.asarray(model.decision_function(rows), np.float32).reshape(-1, 1)]

    return Built(model, {"sample": sample}, {"input": request}, expected)


def one_class_svm(_: Path) -> Built:
    """OneClassSVM (RBF): predict (1 inside, -1 outside) and decision_function."""
    from sklearn.svm import OneClassSVM

    x, _y = _tabular(29, n=120)
    model = OneClassSVM(nu=0.1, gamma="scale").fit(x)
    request = np.concatenate([x[:2], np.full((1, x.shape[1]), 4.0, np.float32)])
    sample = {"input": np.concatenate([x[:30], 3.0 * x[30:40]]).astype(np.float32)}

    def expected(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        rows = np.asarray(feeds["input"])
        return [np.asarray(model.predict(rows)), np.asarray(model.decision_function(rows), np.float32).reshape(-1, 1)]

    return Built(model, {"sample": sample}, {"input": request}, expected)


def _frame(seed: int, n: int = 240) -> tuple[Any, np.ndarray]:
    """A DataFrame with two string columns, an int column and a float column; the label depends on all four."""
    import pandas as pd

    gen = rng(seed)
    city = gen.choice(["lyon", "paris", "nice", "lille"], n)
    plan = gen.choice(["free", "pro", "team"], n)
    age = gen.integers(18, 80, n).astype(np.int64)
    income = gen.gamma(2.0, 20_000.0, n).astype(np.float64)
    score = (city == "paris") * 1.5 + (plan == "pro") * 1.0 - (age - 45) / 20 + (income - 40_000) / 30_000
    frame = pd.DataFrame({"city": city, "plan": plan, "age": age, "income": income})
    return frame, (score + 0.5 * gen.standard_normal(n) > 0.8).astype(np.int64)


def frame_pipeline(final: Callable[[], Any], seed: int) -> Callable[[Path], Built]:
    def build(_: Path) -> Built:
        from sklearn.compose import ColumnTransformer
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        frame, y = _frame(seed)
        prep = ColumnTransformer(
            [
                ("text", OneHotEncoder(handle_unknown="ignore"), ["city", "plan"]),
                ("num", StandardScaler(), ["age", "income"]),
            ]
        )
        model = Pipeline([("prep", prep), ("model", final())]).fit(frame, y)
        rows = frame.iloc[:3]
        request = {c: rows[c].to_numpy().reshape(-1, 1) for c in rows.columns}
        request["city"] = request["city"].astype(object)
        request["city"][2, 0] = "marseille"  # a category the encoder never saw: ignored, as in scikit-learn
        request["plan"] = request["plan"].astype(object)

        def expected(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            import pandas as pd

            df = pd.DataFrame({c: np.asarray(v).reshape(-1) for c, v in feeds.items()})
            return [np.asarray(model.predict(df)), np.asarray(model.predict_proba(df), np.float32)]

        return Built(model, {"sample": frame.iloc[:32]}, request, expected)

    return build


def lightgbm_classifier(_: Path) -> Built:
    import lightgbm

    x, y = _tabular(30)
    model = lightgbm.LGBMClassifier(n_estimators=15, num_leaves=8, random_state=0, verbose=-1).fit(x, y)
    return Built(model, {}, {"input": x[:3]}, _classifier_expected(model))


def xgboost_classifier(_: Path) -> Built:
    import xgboost

    x, y = _tabular(31)
    model = xgboost.XGBClassifier(n_estimators=15, max_depth=3, random_state=0, n_jobs=1).fit(x, y)
    return Built(model, {}, {"input": x[:3]}, _classifier_expected(model))


def catboost_classifier(_: Path) -> Built:
    import catboost

    x, y = _tabular(32)
    model = catboost.CatBoostClassifier(
        iterations=15, depth=3, random_seed=0, verbose=False, thread_count=1, allow_writing_files=False
    )
    model.fit(x, y)
    return Built(model, {}, {"input": x[:3]}, _classifier_expected(model))
