"""Small graph helpers shared by the ONNX passes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# The weight input of each op that carries one, and the axis of its output channels.
WEIGHT_INPUT: dict[str, tuple[int, int]] = {"MatMul": (1, 1), "Gemm": (1, 0), "Conv": (1, 0)}


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(n.op_type if not n.domain else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    return dict(sorted(counts.items()))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


@dataclass
class Weight:
    """A float initializer used as the weight of a MatMul/Gemm/Conv, and its output-channel axis."""

    name: str
    op_type: str
    node: str
    channel_axis: int
    array: np.ndarray


def find_weights(
    model: onnx.ModelProto, op_types: tuple[str, ...], min_elements: int, exclude: tuple[str, ...] = ()
) -> list[Weight]:
    """Float initializers that feed the weight input of ``op_types``, used by nothing else."""
    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(i for n in model.graph.node for i in n.input)
    found: dict[str, Weight] = {}
    for node in model.graph.node:
        if node.op_type not in op_types or node.domain or node.name in exclude:
            continue
        index, axis = WEIGHT_INPUT[node.op_type]
        if len(node.input) <= index or node.input[index] not in inits or uses[node.input[index]] != 1:
            continue
        tensor = inits[node.input[index]]
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if array.size < min_elements or array.ndim < 2:
            continue
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        found[tensor.name] = Weight(tensor.name, node.op_type, node.name, axis, array)
    return list(found.values())


def replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def toposort(model: onnx.ModelProto) -> None:
    """Order the graph's nodes so that every input is produced before it is used (stable otherwise)."""
    graph = model.graph
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a dangling input: leave the rest for the checker to name
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
