"""Tensor specs: the names, element types and shapes a model takes and returns."""

from __future__ import annotations

from typing import Literal, TypeAlias, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from slipstream.frozen import Frozen

DType: TypeAlias = Literal[
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "string",
]
DTYPES: tuple[str, ...] = get_args(DType)

# A dimension is a fixed size or a symbol ("batch", "seq") that is resolved at run time.
Dim: TypeAlias = int | str

# ONNX TensorProto element type -> our dtype name. Kept here (not imported from onnx) so that the
# manifest can be read without onnx installed.
ONNX_ELEM_TO_DTYPE: dict[int, DType] = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}

_NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    name: np.dtype(name) for name in DTYPES if name not in ("bfloat16", "string")
}
_NUMPY_DTYPES["string"] = np.dtype(np.object_)


def numpy_dtype(dtype: DType) -> np.dtype[np.generic]:
    """The numpy dtype that carries ``dtype``; bfloat16 has none in numpy."""
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype {dtype!r} has no numpy equivalent")
    return _NUMPY_DTYPES[dtype]


class Quantization(Frozen):
    """How an integer tensor maps to real numbers: ``real = scale * (q - zero_point)``.

    A client holding float data needs both numbers to build the integers a quantized input takes
    (``q = round(real / scale) + zero_point``, clipped to the dtype); without them it cannot call the model.
    """

    scale: float = Field(gt=0, description="Real-valued size of one integer step.")
    zero_point: int = Field(description="The integer that stands for real 0.")


# Fields added after manifests were first written: left out of the JSON while unset, so a manifest
# that does not use them stays readable by earlier readers (which refuse unknown keys).
_OMIT_WHEN_UNSET = ("max_shape", "quantization")


class TensorSpec(BaseModel):
    """One model input or output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="The tensor's name in the graph.")
    dtype: DType = Field(description="Element type.")
    shape: tuple[Dim, ...] = Field(description="Dimensions; a string is a symbolic (run-time) size.")
    value_range: tuple[float, float] | None = Field(
        default=None, description="Inclusive [low, high] of valid values, when known."
    )
    max_shape: tuple[int | None, ...] | None = Field(
        default=None,
        description="Largest size each axis accepts, read from the graph (a position table's rows bound the "
        "sequence axis); None on an axis the graph does not bound. Unset when no axis is bounded.",
    )
    quantization: Quantization | None = Field(
        default=None,
        description="Scale and zero point of a quantized integer tensor (read from the DequantizeLinear that "
        "consumes it), so a client can quantize float data; unset for tensors that are not quantized.",
    )

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data: dict[str, object] = handler(self)
        for key in _OMIT_WHEN_UNSET:
            if data.get(key, 0) is None:
                del data[key]
        return data

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if isinstance(d, str))

    def shape_text(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"
