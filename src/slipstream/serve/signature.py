"""One check of a request's tensors against a model's signature, collecting every problem.

Names, datatypes, ranks, fixed and symbolic dimensions, axis limits (``TensorSpec.max_shape``), NaN/Inf
and value ranges (``TensorSpec.value_range``) are checked in one pass, and every problem found goes into
one :class:`~slipstream.errors.InputError` (a 400): a caller fixing a request learns everything wrong
with it at once, not one problem per round trip. The server never casts: the Open Inference Protocol
says the datatype sent must be the model's.

The check is planned once per model version (:class:`Signature`), so a request pays for a few dict
lookups, a shape comparison and one min/max per numeric input. Ranges and axis limits come from the
graph (an embedding table's rows, a position table's length): past them onnxruntime fails mid-graph,
and that is the client's error, not the server's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.errors import InputError
from slipstream.serve.codec import DATATYPE_OF, datatype_of_array
from slipstream.serve.settings import NonFinitePolicy

# The NaN/Inf screen sums small float inputs in float64 (one call, 1.5 µs for 64 values); from this many
# values on, np.isfinite(...).all() is cheaper, as the sum casts every value (1 MiB FP32: 29 µs against 101).
SUM_SCREEN_BELOW = 4096


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a request's tensors: what, and what to do about it."""

    input_name: str
    message: str
    hint: str


@dataclass(frozen=True, slots=True)
class _Plan:
    """One input's checks, resolved once from its spec."""

    spec: TensorSpec
    name: str
    datatype: str
    dtype: np.dtype[np.generic] | None  # None: numpy cannot carry it (bfloat16)
    dims: tuple[int | str, ...]
    limits: tuple[tuple[int, int], ...]  # (axis, largest size) for each bounded axis
    finite: bool  # NaN/Inf refused (float inputs only)
    value_range: tuple[float, float] | None
    numeric: bool
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of each fixed axis
    shared: tuple[tuple[int, str], ...]  # (axis, symbol) of each symbolic axis another input also has
    sum_finite: bool  # NaN/Inf show in a float64 sum of the values: one reduction answers the NaN/Inf check


class Signature:
    """A model version's inputs, planned once; :meth:`check` is the one check every request passes."""

    def __init__(self, specs: Iterable[TensorSpec], *, non_finite: NonFinitePolicy = "reject") -> None:
        plans = []
        specs = tuple(specs)
        counts: dict[str, int] = {}
        for spec in specs:
            for dim in set(spec.shape):
                if isinstance(dim, str):
                    counts[dim] = counts.get(dim, 0) + 1
        for spec in specs:
            dtype = None if spec.dtype == "bfloat16" else numpy_dtype(spec.dtype)
            limits = tuple((axis, limit) for axis, limit in enumerate(spec.max_shape or ()) if limit is not None)
            numeric = dtype is not None and dtype.kind in "fiu"
            plans.append(
                _Plan(
                    spec=spec,
                    name=spec.name,
                    datatype=DATATYPE_OF[spec.dtype],
                    dtype=dtype,
                    dims=spec.shape,
                    limits=limits,
                    finite=non_finite == "reject" and dtype is not None and dtype.kind == "f",
                    value_range=spec.value_range if numeric else None,
                    numeric=numeric,
                    fixed=tuple((a, d) for a, d in enumerate(spec.shape) if isinstance(d, int)),
                    shared=tuple((a, d) for a, d in enumerate(spec.shape) if isinstance(d, str) and counts[d] > 1),
                    # float16/32 values sum in float64 without overflow (2**56 of them at most), so the sum is
                    # finite exactly when every value is; float64 values could overflow it and take np.isfinite.
                    sum_finite=non_finite == "reject"
                    and dtype is not None
                    and dtype.kind == "f"
                    and dtype.itemsize < 8,
                )
            )
        self._plans = tuple(plans)
        self._names = tuple(p.name for p in plans)
        self.datatypes: dict[str, str] = {p.name: p.datatype for p in plans}

    def check(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` in the model's order, or one InputError listing every problem found."""
        if not self._passes(inputs):  # the fast screen doubts something: look properly, and say what
            problems = self.problems(inputs)
            if problems:
                raise input_error(problems)
        if len(self._plans) == 1 and isinstance(inputs, dict):
            return inputs
        return {name: inputs[name] for name in self._names}

    def _passes(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """True only if :meth:`problems` would find none; cheap, and never a message (the hot path)."""
        if len(inputs) != len(self._plans):
            return False
        seen: dict[str, int] = {}
        for plan in self._plans:
            array = inputs.get(plan.name)
            if array is None or (array.dtype is not plan.dtype and array.dtype != plan.dtype):
                return False
            shape = array.shape
            if len(shape) != len(plan.dims):
                return False
            for axis, size in plan.fixed:
                if shape[axis] != size:
                    return False
            for axis, symbol in plan.shared:
                if seen.setdefault(symbol, shape[axis]) != shape[axis]:
                    return False
            for axis, limit in plan.limits:
                if shape[axis] > limit:
                    return False
            if not array.size or not plan.numeric:
                continue
            if plan.value_range is not None:
                low, high = plan.value_range
                if not (low <= array.min() and array.max() <= high):  # NaN fails both comparisons
                    return False
                if math.isfinite(low) and math.isfinite(high):  # within finite bounds, hence finite
                    continue
            if plan.sum_finite and array.size < SUM_SCREEN_BELOW:
                if not math.isfinite(np.add.reduce(array, axis=None, dtype=np.float64)):
                    return False
            elif plan.finite and not np.isfinite(array).all():
                return False
        return True

    def problems(self, inputs: Mapping[str, np.ndarray]) -> list[Problem]:
        problems: list[Problem] = []
        if len(inputs) != len(self._names) or any(n not in inputs for n in self._names):
            problems.append(self._names_problem(inputs))
        symbols: dict[str, tuple[int, str]] = {}
        for plan in self._plans:
            array = inputs.get(plan.name)
            if array is not None:
                _check_one(plan, array, symbols, problems)
        return problems

    def _names_problem(self, inputs: Mapping[str, np.ndarray]) -> Problem:
        missing = [n for n in self._names if n not in inputs]
        extra = [n for n in inputs if n not in self.datatypes]
        return Problem(
            (missing or extra or [""])[0],
            f"Expected inputs [{', '.join(self._names)}]; got [{', '.join(inputs)}]"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else "")
            + ".",
            "Send exactly the inputs GET /v2/models/{name} lists.",
        )


def _check_one(plan: _Plan, array: np.ndarray, symbols: dict[str, tuple[int, str]], out: list[Problem]) -> None:
    name, spec = plan.name, plan.spec
    if plan.dtype is None:
        out.append(Problem(name, f"Input '{name}' is bfloat16, which this server cannot carry.", "Re-export as FP32."))
        return
    if array.dtype != plan.dtype and not (plan.dtype.kind == "O" and array.dtype.kind in "OUS"):
        sent = datatype_of_array(array)
        out.append(
            Problem(
                name,
                f"Input '{name}' must be sent as {plan.datatype}; got {sent}. The protocol requires the datatype "
                "to match the model's, so the server does not cast.",
                f"Convert the data to {plan.datatype} on the client and send 'datatype': '{plan.datatype}'.",
            )
        )
        return  # its values mean something else: ranges and NaN checks would only add noise
    shape = array.shape
    if len(shape) != len(plan.dims):
        out.append(
            Problem(
                name,
                f"Input '{name}' must have shape {spec.shape_text()} (rank {len(plan.dims)}); "
                f"got {list(shape)} (rank {len(shape)}).",
                "Reshape the data to the model's rank.",
            )
        )
        return
    shape_ok = True
    for axis, (dim, size) in enumerate(zip(plan.dims, shape, strict=True)):
        if type(dim) is int:
            if dim != size:
                shape_ok = False
                out.append(
                    Problem(
                        name,
                        f"Input '{name}' must have shape {spec.shape_text()}; got {list(shape)} "
                        f"(axis {axis} must be {dim}).",
                        "Reshape the data, or re-export the model with a dynamic axis there.",
                    )
                )
        else:
            seen = symbols.setdefault(str(dim), (size, name))
            if seen[0] != size:
                shape_ok = False
                out.append(
                    Problem(
                        name,
                        f"Input '{name}' axis {axis} is '{dim}', which input '{seen[1]}' set to {seen[0]}; got {size}.",
                        f"All inputs must agree on the size of '{dim}'.",
                    )
                )
    for axis, limit in plan.limits:
        if shape[axis] > limit:
            shape_ok = False
            out.append(
                Problem(
                    name,
                    f"Input '{name}' axis {axis} ('{plan.dims[axis]}') has size {shape[axis]}; this model takes at "
                    f"most {limit} there (a table in the graph holds {limit} positions along it).",
                    f"Truncate the sequence to {limit}, or split it into windows of at most {limit}.",
                )
            )
    if shape_ok and plan.numeric and array.size:
        _check_values(plan, array, out)


def _check_values(plan: _Plan, array: np.ndarray, out: list[Problem]) -> None:
    if not plan.finite and plan.value_range is None:
        return
    # min and max see NaN (it propagates) and Inf (it is the extreme): two reductions answer both checks.
    lo, hi = float(array.min()), float(array.max())
    name = plan.name
    if plan.finite and not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        out.append(
            Problem(
                name,
                f"Input '{name}' holds {bad} NaN or Inf value(s); this server rejects them.",
                "Clean the data, or start the server with --non-finite allow.",
            )
        )
        return
    if plan.value_range is None:
        return
    low, high = plan.value_range
    if lo < low or hi > high or math.isnan(lo) or math.isnan(hi):
        bad = int(array.size - np.count_nonzero((array >= low) & (array <= high)))  # NaN counts
        out.append(
            Problem(
                name,
                f"Input '{name}' must lie in [{low:g}, {high:g}]; got values in [{lo:g}, {hi:g}] ({bad} outside).",
                f"These ids index a table of {high - low + 1:g} rows: take them from the model's own vocabulary "
                "(its tokenizer), and map unknown tokens to its unknown-token id."
                if array.dtype.kind in "iu"
                else "Scale the data the way the model was trained.",
            )
        )


def input_error(problems: list[Problem]) -> InputError:
    """One 400 for every problem: a lone problem reads as itself; several are numbered, hints merged."""
    if len(problems) == 1:
        only = problems[0]
        return InputError(only.message, input_name=only.input_name or None, hint=only.hint)
    listed = " ".join(f"({i}) {p.message}" for i, p in enumerate(problems, 1))
    hints = list(dict.fromkeys(p.hint for p in problems))
    return InputError(
        f"The request has {len(problems)} problems: {listed}",
        input_name=problems[0].input_name or None,
        hint=" ".join(hints),
    )
