"""What values an input may take, read from the graph: token ids index an embedding table.

Generated parity inputs used to draw 0-9 for every integer input. For a token-id input that is harmless
only by luck, and the serving guard could not refuse an id past the vocabulary. The graph says the truth:
an integer input that reaches a Gather on a constant table (through casts and reshapes only) indexes
rows of that table, so its valid range is ``[0, rows - 1]``. The range is recorded in the manifest's
input spec (``value_range``), where generated data, the serving guard and warm-up all read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from slipstream.artifact.tensor import TensorSpec

# Ops that carry an index tensor's values through unchanged (only its type or shape changes).
_VALUE_PRESERVING = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"})


def _table_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Constant tensors (initializers and Constant nodes) by name → their first dimension."""
    rows = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) >= 1}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and len(attr.t.dims) >= 1:
                    rows[node.output[0]] = int(attr.t.dims[0])
    return rows


def _gather_axis(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 0)


def embedding_rows(model: onnx.ModelProto, input_name: str) -> int | None:
    """The size of the smallest embedding table that ``input_name`` indexes, or None if it indexes none."""
    tables = _table_rows(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: list[int] = []
    frontier, seen = [input_name], {input_name}
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                if node.input[0] in tables and _gather_axis(node) == 0:
                    found.append(tables[node.input[0]])
            elif node.op_type in _VALUE_PRESERVING and node.input and node.input[0] == tensor:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return min(found) if found else None


def with_graph_ranges(specs: Sequence[TensorSpec], model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """``specs`` with ``value_range`` set on integer inputs that index an embedding table (others unchanged)."""
    out = []
    for spec in specs:
        if spec.value_range is None and spec.dtype in ("int8", "int16", "int32", "int64", "uint8", "uint16"):
            rows = embedding_rows(model, spec.name)
            if rows is not None and rows > 0:
                spec = spec.model_copy(update={"value_range": (0.0, float(rows - 1))})
        out.append(spec)
    return tuple(out)
