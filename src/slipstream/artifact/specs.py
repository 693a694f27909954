"""Tensor specs read from an ONNX graph, and what a bundle's specs say about how it can be called."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from slipstream.artifact.tensor import ONNX_ELEM_TO_DTYPE, Dim, TensorSpec, numpy_dtype
from slipstream.errors import InvalidModelError

if TYPE_CHECKING:
    import onnx


def value_info_spec(info: onnx.ValueInfoProto) -> TensorSpec:
    ttype = info.type.tensor_type
    if not info.type.HasField("tensor_type"):
        raise InvalidModelError(
            f"Graph io '{info.name}' is not a tensor (it is a {info.type.WhichOneof('value')}); "
            "slipstream serves tensor inputs and outputs only.",
            hint="Re-export with plain tensor outputs (for scikit-learn: options zipmap=False).",
        )
    dtype = ONNX_ELEM_TO_DTYPE.get(ttype.elem_type)
    if dtype is None:
        raise InvalidModelError(
            f"Graph io '{info.name}' has ONNX element type {ttype.elem_type}, which slipstream does not support.",
            hint="Cast it to a standard numeric type in the model.",
        )
    dims: list[Dim] = []
    for i, d in enumerate(ttype.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(f"{info.name}_dim{i}")
    return TensorSpec(name=info.name, dtype=dtype, shape=tuple(dims))


def graph_io_specs(graph: onnx.GraphProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's real inputs (initializers excluded) and outputs."""
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(value_info_spec(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(value_info_spec(v) for v in graph.output)
    return inputs, outputs


def is_batchable(inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> bool:
    """Requests can be stacked into one batch: one shared symbolic first axis on every input and output.

    The server batches by this rule, and every export target that batches (Triton, Ray) asks the same one.
    """
    firsts = {spec.shape[0] if spec.rank else None for spec in (*inputs, *outputs)}
    return len(firsts) == 1 and isinstance(next(iter(firsts)), str)


def placeholder_feeds(inputs: Iterable[TensorSpec], batch: int = 1) -> dict[str, np.ndarray]:
    """One call's inputs that fit the specs (symbolic dims: ``batch``), each valued at its range's low end.

    For warming a session up and measuring its footprint: valid for the graph (an index stays in its table),
    meaningless as data.
    """
    feeds = {}
    for spec in inputs:
        shape = tuple(d if isinstance(d, int) else batch for d in spec.shape)
        if spec.dtype == "string":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        else:
            low = spec.value_range[0] if spec.value_range else 0
            feeds[spec.name] = np.full(shape, low, dtype=numpy_dtype(spec.dtype))
    return feeds
