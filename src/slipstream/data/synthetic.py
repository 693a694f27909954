"""Generated example inputs that match a model's tensor specs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.errors import ConfigError

# Symbolic dims that are not the batch axis get this size unless the caller names one.
DEFAULT_SYMBOL_SIZE = 8


def resolve_shape(spec: TensorSpec, batch: int, dims: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape: axis 0 if symbolic is the batch; other symbols come from ``dims``."""
    shape: list[int] = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int):
            shape.append(d)
        elif d in dims:
            shape.append(dims[d])
        elif axis == 0:
            shape.append(batch)
        else:
            shape.append(DEFAULT_SYMBOL_SIZE)
    return tuple(shape)


def example_inputs(
    specs: Sequence[TensorSpec],
    batch: int = 1,
    *,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs: standard normal floats (or uniform within ``value_range``), small ints, bools."""
    if batch < 1:
        raise ConfigError(f"Batch size must be at least 1; got {batch}.", field="batch")
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = resolve_shape(spec, batch, dims)
        if spec.dtype in ("string", "bfloat16"):
            raise ConfigError(
                f"Cannot generate example data for input '{spec.name}' of type {spec.dtype}.",
                field=spec.name,
                hint="Provide sample data for this model.",
            )
        dtype = numpy_dtype(spec.dtype)
        if dtype.kind == "f":
            if spec.value_range is not None:
                low, high = spec.value_range
                values = rng.uniform(low, high, size=shape)
            else:
                values = rng.standard_normal(size=shape)
            feeds[spec.name] = values.astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            low, high = (0, 10) if spec.value_range is None else (int(spec.value_range[0]), int(spec.value_range[1]))
            feeds[spec.name] = rng.integers(low, high + 1 if spec.value_range else high, size=shape).astype(dtype)
    return feeds
