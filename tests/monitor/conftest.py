"""Real data and a real model for the monitor tests: sklearn digits and a logistic regression trained on
it, exported to ONNX (Gemm + Softmax) and imported as a bundle, so profiles come from onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slipstream.artifact import Bundle
from slipstream.importers import import_onnx
from slipstream.monitor.profile import Profile, profile_from_bundle
from slipstream.runtime.engine import Engine


@dataclass(frozen=True)
class Digits:
    """Three disjoint splits: the model is trained on ``train``, profiled on ``ref`` (held out, so build-time
    accuracy and the confidence calibration are honest), and ``live`` plays the production traffic."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_ref: np.ndarray
    y_ref: np.ndarray
    x_live: np.ndarray
    y_live: np.ndarray

    def noisy(self, x: np.ndarray, scale: float = 4.0, seed: int = 1) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.clip(x + rng.normal(0, scale, x.shape), 0, 16).astype(np.float32)

    @staticmethod
    def inverted(x: np.ndarray) -> np.ndarray:
        return (16 - x).astype(np.float32)


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    return Digits(x[:600], y[:600], x[600:1200], y[600:1200], x[1200:], y[1200:])


def _classifier_onnx(weights: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["pixels", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits-logreg",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _train_softmax(x: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent (numpy; ~0.1 s, no sklearn fit)."""
    xs = x.astype(np.float64) / 16.0
    onehot = np.eye(10)[y]
    w = np.zeros((64, 10))
    b = np.zeros(10)
    for _ in range(steps):
        z = xs @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / len(xs)
        w -= lr * (xs.T @ grad + 1e-3 * w)
        b -= lr * grad.sum(axis=0)
    # The model takes raw pixels (0..16): fold the /16 scaling into the weights.
    return (w / 16.0).astype(np.float32), b.astype(np.float32)


@pytest.fixture(scope="session")
def digits_bundle(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights, bias = _train_softmax(digits.x_train, digits.y_train)
    model = _classifier_onnx(weights, bias)
    root = tmp_path_factory.mktemp("digits")
    onnx.save_model(model, str(root / "digits.onnx"))
    return import_onnx(root / "digits.onnx", root / "bundle").path


@pytest.fixture(scope="session")
def digits_engine(digits_bundle: Path) -> Engine:
    return Engine(Bundle.load(digits_bundle))


@pytest.fixture(scope="session")
def digits_profile(digits_bundle: Path, digits: Digits) -> Profile:
    return profile_from_bundle(digits_bundle, {"pixels": digits.x_ref}, digits.y_ref)
