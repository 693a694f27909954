"""Tiny real ONNX models built with onnx.helper, for tests."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slipstream.demo import build_mlp

__all__ = ["build_mlp", "build_token_scorer", "save_with_external_data"]


def build_token_scorer() -> onnx.ModelProto:
    """Two inputs with shared symbolic dims: int64 ids [batch, seq] and a float mask → one score per row."""
    weight = numpy_helper.from_array(np.array([0.5], dtype=np.float32), "scale")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "attention_mask"], ["masked"]),
        helper.make_node("Mul", ["masked", "scale"], ["scaled"]),
        helper.make_node("ReduceSum", ["scaled", "axes"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "token_scorer",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
        initializer=[weight, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save_with_external_data(model: onnx.ModelProto, path: Path) -> Path:
    """Save with every initializer in a side file, as large exports are."""
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".weights",
        size_threshold=0,
    )
    return path


def build_trained_digits_mlp(hidden: int = 64, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A real classifier: scikit-learn's MLP trained on load_digits, written as an ONNX graph by hand.

    Returns the model (input 'pixels' [batch, 64] float32 → 'probabilities' [batch, 10]) and a held-out
    test split (pixels, labels). Trained once per (hidden, seed) and session; every call gets its own copies.
    """
    w0, b0, w1, b1, x_test, y_test = _trained_digits_mlp(hidden, seed)
    model = digits_mlp_graph(w0, b0, w1, b1, ir_version=8)
    return model, x_test.copy(), y_test.copy()


@functools.cache
def _trained_digits_mlp(hidden: int, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    # One BLAS thread: these small matrices gain nothing from more, and a busy 2-core machine loses a lot.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # A few hundred iterations reach ~97 % test accuracy; full convergence is not the point here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed).fit(x_train, y_train)
    return clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1], clf.intercepts_[1], x_test, y_test.astype(np.int64)


def digits_mlp_graph(
    w0: np.ndarray, b0: np.ndarray, w1: np.ndarray, b1: np.ndarray, *, ir_version: int = 8
) -> onnx.ModelProto:
    """Gemm (fc0) → Relu → Gemm (fc1) → Softmax over 'pixels' [batch, 64], from trained weights."""
    inits = [
        numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)
        for a, name in ((w0, "fc0.weight"), (b0, "fc0.bias"), (w1, "fc1.weight"), (b1, "fc1.bias"))
    ]
    nodes = [
        helper.make_node("Gemm", ["pixels", "fc0.weight", "fc0.bias"], ["h"], name="fc0"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu0"),
        helper.make_node("Gemm", ["h_relu", "fc1.weight", "fc1.bias"], ["logits"], name="fc1"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model
