"""Generated example inputs that match a model's tensor specs, and what each input means.

The values follow the input's meaning where the spec or the name says it: an attention mask (an input
named ``*mask*``) is all ones, as for unpadded text, since a random mask can blank out whole rows and
turn a parity check into a comparison of NaNs or of noise; integers stay inside the recorded
``value_range`` (the importers record an embedding table's size for token ids); other integers without a
range take small values (``DEFAULT_INT_RANGE``), floats are standard normal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.errors import ConfigError

# Symbolic dims that are not the batch axis get this size unless the caller names one.
DEFAULT_SYMBOL_SIZE = 8
# Integers without a recorded range: inclusive, small enough to index any table or one-hot of size 10.
DEFAULT_INT_RANGE = (0, 9)


def is_mask(spec: TensorSpec) -> bool:
    """An attention/padding mask, by the convention every tokenizer follows: its name contains 'mask'."""
    return "mask" in spec.name.lower()


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
    """Random inputs: standard normal floats (or uniform within ``value_range``), integers within
    ``value_range`` (else ``DEFAULT_INT_RANGE``), bools; masks are all ones."""
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
        if is_mask(spec):
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        elif dtype.kind == "f":
            if spec.value_range is not None:
                low, high = spec.value_range
                values = rng.uniform(low, high, size=shape)
            else:
                values = rng.standard_normal(size=shape)
            feeds[spec.name] = values.astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            low, high = DEFAULT_INT_RANGE if spec.value_range is None else spec.value_range
            feeds[spec.name] = rng.integers(int(low), int(high) + 1, size=shape).astype(dtype)
    return feeds
