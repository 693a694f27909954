"""Tensor specs read from an ONNX graph."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slipstream.artifact.tensor import ONNX_ELEM_TO_DTYPE, Dim, TensorSpec
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
