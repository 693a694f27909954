"""What values and sizes an input may take, read from the graph: token ids index an embedding table.

Generated parity inputs used to draw 0-9 for every integer input. For a token-id input that is harmless
only by luck, and the serving guard could not refuse an id past the vocabulary. The graph says the truth,
and what it says is recorded in the manifest's input spec, where generated data, the serving guard and
warm-up all read it:

- ``value_range``: an integer input that reaches a Gather on a constant table (through casts and reshapes
  only) indexes rows of that table, so its valid range is ``[0, rows - 1]``.
- ``max_shape``: an axis whose size becomes positions into a constant table (``Range(0, seq)`` gathered from
  a position table) or the end of a Slice of a constant (``position_ids[:, :seq]``, ``pos.weight[:seq]``)
  cannot exceed that table. Past it onnxruntime fails deep in the graph (or a Slice silently clamps and a
  later Add fails), which the server would otherwise answer with a 500.
- ``quantization``: an integer input consumed by a DequantizeLinear with a constant per-tensor scale and
  zero point (a TFLite int8 model, a QDQ model) is quantized data; a client needs both numbers to make it.

Where the graph does not tell, nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from slipstream.artifact.tensor import Quantization, TensorSpec

# Ops that carry an index tensor's values through unchanged (only its type or shape changes).
_VALUE_PRESERVING = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"})
_INTEGER = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16"})
# A constant this large is a weight table, never a slice bound or a shape index: do not decode it.
_SMALL = 64


class _Graph:
    """Lookups over one graph: constant tensors, consumers of each value, and the op producing it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.constants: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                self.producer[name] = node

    def rows(self, name: str) -> int | None:
        """The first dimension of constant ``name``, or None if it is not a constant of rank >= 1."""
        tensor = self.constants.get(name)
        return int(tensor.dims[0]) if tensor is not None and len(tensor.dims) >= 1 else None

    def small_ints(self, name: str) -> list[int] | None:
        """The values of a small integer constant (a slice bound, an axis), flattened; None otherwise."""
        tensor = self.constants.get(name)
        if tensor is None or int(np.prod(tensor.dims, dtype=np.int64)) > _SMALL:
            return None
        values = numpy_helper.to_array(tensor)
        return [int(v) for v in values.reshape(-1)] if values.dtype.kind in "iu" else None

    def small_floats(self, name: str) -> list[float] | None:
        tensor = self.constants.get(name)
        if tensor is None or int(np.prod(tensor.dims, dtype=np.int64)) > _SMALL:
            return None
        return [float(v) for v in numpy_helper.to_array(tensor).reshape(-1)]

    def carried(self, start: str) -> Iterator[str]:
        """``start`` and every value that holds the same numbers through value-preserving ops."""
        frontier, seen = [start], {start}
        while frontier:
            tensor = frontier.pop()
            yield tensor
            for node in self.consumers.get(tensor, []):
                if node.op_type in _VALUE_PRESERVING and node.input and node.input[0] == tensor:
                    for out in node.output:
                        if out not in seen:
                            seen.add(out)
                            frontier.append(out)


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def embedding_rows(model: onnx.ModelProto, input_name: str) -> int | None:
    """The size of the smallest embedding table that ``input_name`` indexes, or None if it indexes none."""
    return _gathered_rows(_Graph(model), input_name)


def _gathered_rows(graph: _Graph, start: str) -> int | None:
    found: list[int] = []
    for tensor in graph.carried(start):
        for node in graph.consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                rows = graph.rows(node.input[0])
                if rows is not None and _attr_int(node, "axis", 0) == 0:
                    found.append(rows)
    return min(found) if found else None


def _dimension_tensors(graph: _Graph, input_name: str, rank: int) -> Iterator[tuple[str, int]]:
    """Values that hold one axis size of ``input_name``: (value, axis)."""
    for node in graph.consumers.get(input_name, []):
        if node.op_type != "Shape" or node.input[0] != input_name:
            continue
        start = _attr_int(node, "start", 0) % rank if rank else 0
        end = _attr_int(node, "end", rank)
        end = end + rank if end < 0 else min(end, rank)
        if end <= start:
            continue
        if end - start == 1:  # Shape(x, start=a, end=a+1): the one size
            yield from ((v, start) for v in graph.carried(node.output[0]))
            continue
        for shape in graph.carried(node.output[0]):  # the whole shape, then Gather(shape, k)
            for pick in graph.consumers.get(shape, []):
                index = graph.small_ints(pick.input[1]) if pick.op_type == "Gather" and len(pick.input) > 1 else None
                if index is not None and len(index) == 1 and pick.input[0] == shape:
                    yield from ((v, start + index[0] % (end - start)) for v in graph.carried(pick.output[0]))


def _axis_limits(graph: _Graph, input_name: str, rank: int) -> dict[int, int]:
    """Axis → the largest size the graph can take there (only axes it bounds)."""
    limits: dict[int, int] = {}

    def bound(axis: int, size: int) -> None:
        limits[axis] = min(size, limits.get(axis, size))

    for value, axis in _dimension_tensors(graph, input_name, rank):
        for node in graph.consumers.get(value, []):
            if node.op_type == "Range" and len(node.input) == 3 and node.input[1] == value:
                first, step = graph.small_ints(node.input[0]), graph.small_ints(node.input[2])
                rows = _gathered_rows(graph, node.output[0])
                if first and step == [1] and rows is not None and first[0] >= 0:
                    bound(axis, rows - first[0])  # positions first .. first + size - 1 index the table
            elif node.op_type == "Slice" and len(node.input) >= 3 and node.input[2] == value:
                limit = _slice_limit(graph, node)
                if limit is not None:
                    bound(axis, limit)
    return limits


def _slice_limit(graph: _Graph, node: onnx.NodeProto) -> int | None:
    """For ``constant[start:size]`` along one axis: the largest ``size`` that does not run off the end."""
    data = graph.constants.get(node.input[0])
    starts = graph.small_ints(node.input[1])
    axes = graph.small_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
    steps = graph.small_ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if data is None or starts is None or axes is None or steps != [1] or len(starts) != 1 or len(axes) != 1:
        return None
    dims = list(data.dims)
    if not dims or not -len(dims) <= axes[0] < len(dims) or starts[0] < 0:
        return None
    return int(dims[axes[0]])  # the end is a position (start stays a constant): ends <= the axis's length


def input_quantization(model: onnx.ModelProto, input_name: str) -> Quantization | None:
    """Scale and zero point of the per-tensor DequantizeLinear that reads ``input_name``, if there is one."""
    return _quantization(_Graph(model), input_name)


def _quantization(graph: _Graph, input_name: str) -> Quantization | None:
    for node in graph.consumers.get(input_name, []):
        if node.op_type != "DequantizeLinear" or node.input[0] != input_name:
            continue
        scale = graph.small_floats(node.input[1])
        has_zero = len(node.input) > 2 and node.input[2]
        zero = graph.small_ints(node.input[2]) if has_zero else [0]
        if scale is not None and zero is not None and len(scale) == 1 and len(zero) == 1 and scale[0] > 0:
            return Quantization(scale=scale[0], zero_point=zero[0])
    return None


def with_graph_ranges(specs: Sequence[TensorSpec], model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """``specs`` with what the graph says about them set: ``value_range`` (integer inputs that index an
    embedding table), ``max_shape`` (axes a position table bounds) and ``quantization`` (quantized inputs).

    An axis limit applies to every input that shares the axis's symbol: the engine already makes inputs
    agree on a symbol's size, so ``attention_mask`` is bounded wherever ``input_ids`` is.
    """
    graph = _Graph(model)
    by_symbol: dict[str, int] = {}
    limits: dict[str, dict[int, int]] = {}
    for spec in specs:
        limits[spec.name] = _axis_limits(graph, spec.name, spec.rank)
        for axis, size in limits[spec.name].items():
            dim = spec.shape[axis]
            if isinstance(dim, str):
                by_symbol[dim] = min(size, by_symbol.get(dim, size))
    out = []
    for spec in specs:
        update: dict[str, object] = {}
        if spec.value_range is None and spec.dtype in _INTEGER:
            rows = _gathered_rows(graph, spec.name)
            if rows is not None and rows > 0:
                update["value_range"] = (0.0, float(rows - 1))
        axis_max = [
            limits[spec.name].get(axis, by_symbol.get(dim) if isinstance(dim, str) else None)
            for axis, dim in enumerate(spec.shape)
        ]
        bounded = tuple(m if isinstance(d, str) else None for d, m in zip(spec.shape, axis_max, strict=True))
        if spec.max_shape is None and any(m is not None for m in bounded):
            update["max_shape"] = bounded
        if spec.quantization is None and spec.dtype in _INTEGER:
            quantization = _quantization(graph, spec.name)
            if quantization is not None:
                update["quantization"] = quantization
        out.append(spec.model_copy(update=update) if update else spec)
    return tuple(out)
