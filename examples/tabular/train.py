"""A scikit-learn classifier on the breast-cancer data, saved with joblib, plus the example's data files.

    .venv/bin/python examples/tabular/train.py [--out build-output/tabular]

Writes into OUT:
  model.joblib   StandardScaler + LogisticRegression, fitted on 70 % of the rows
  eval.npz       the held-out 30 %: `input` (float32 [n, 30]) and `labels` (what the recipe evaluates on)
  sample.npz     the held-out inputs alone, for the parity proof of `slipstream convert --sample-data`
  groups.npy     the synthetic group of every held-out row (see `group_of`)

The data set has no demographic column, so the example derives a synthetic one deterministically from a
feature: rows whose `mean texture` is below the training median are group "a", the others group "b".
It stands in for an attribute such as a clinic or a region, sent per request as `parameters: {"group": ...}`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

SEED = 0
TEXTURE = 1  # column index of `mean texture` in load_breast_cancer


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out rows (float32 features, int64 labels), the same on every run."""
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.3, random_state=SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test


def group_of(x: np.ndarray, threshold: float) -> np.ndarray:
    """The synthetic group of each row: "a" below the texture threshold, "b" at or above it."""
    return np.where(x[:, TEXTURE] < threshold, "a", "b")


def train(out: Path) -> Pipeline:
    """Fit the pipeline and write model.joblib, eval.npz, sample.npz and groups.npy into ``out``."""
    x_train, y_train, x_test, y_test = split()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=SEED))
    model.fit(x_train, y_train)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out / "model.joblib")
    np.savez(out / "eval.npz", input=x_test, labels=y_test)
    np.savez(out / "sample.npz", input=x_test)
    np.save(out / "groups.npy", group_of(x_test, float(np.median(x_train[:, TEXTURE]))))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build-output/tabular"))
    args = parser.parse_args()
    model = train(args.out)
    _, _, x_test, y_test = split()
    accuracy = float((model.predict(x_test) == y_test).mean())
    written = "model.joblib, eval.npz, sample.npz, groups.npy"
    print(f"held-out accuracy {accuracy:.4f} on {len(y_test)} rows; wrote {written} in {args.out}")


if __name__ == "__main__":
    main()
