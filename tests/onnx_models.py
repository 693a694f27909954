"""Tiny real ONNX models built with onnx.helper, for tests."""

from __future__ import annotations

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
