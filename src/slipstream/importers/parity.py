"""The parity proof: run the source and the ONNX model on the same inputs and compare every output.

Every importer calls :func:`prove_parity` after export. It runs several batch sizes and, where the
model has other symbolic dims (a sequence length), several sizes of those too, so that a dynamic axis
that the exporter baked in as a constant shows up as a failure instead of a surprise in production.
All mismatches are collected first; then one :class:`~slipstream.errors.ParityError` lists them all.

A proof is only as good as its inputs: an output that is the same for every input (a randomly initialised
CNN whose activations die out, a classifier that predicts one class on noise) matches any conversion that
also outputs that constant. Such a proof passes but is recorded as not informative, with a warning that
says to pass real inputs (``--sample``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnxruntime as ort

from slipstream.artifact.manifest import OutputParity, ParityCase, ParityRecord
from slipstream.artifact.tensor import TensorSpec
from slipstream.data.synthetic import example_inputs
from slipstream.errors import ParityError

# (atol, rtol) per output dtype. Integer, bool and string outputs are compared exactly unless the caller
# gives a tolerance for their dtype (e.g. int8 outputs of a quantized TFLite model: a step or two).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-6, 1e-5),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
# Batch sizes tried when the batch axis is dynamic: 1 and an odd size unlikely to be an export default.
DEFAULT_BATCHES = (1, 3)
# Sizes tried for other symbolic dims (sequence lengths): two different ones catch a baked-in size.
DEFAULT_DIM_SIZES = (8, 13)

Reference = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class InputCase:
    """One set of inputs; ``batch`` and ``dims`` are recorded with the result."""

    feeds: Mapping[str, np.ndarray]
    batch: int
    dims: dict[str, int] = field(default_factory=dict)

    def label(self) -> str:
        parts = [f"batch={self.batch}", *(f"{k}={v}" for k, v in sorted(self.dims.items()))]
        return ", ".join(parts)


def generated_cases(
    specs: Sequence[TensorSpec],
    *,
    batches: Sequence[int] = DEFAULT_BATCHES,
    dim_sizes: Sequence[int] = DEFAULT_DIM_SIZES,
    seed: int = 0,
) -> list[InputCase]:
    """Random inputs at every batch size, and every listed size of the other symbolic dims."""
    symbols = sorted({d for s in specs for axis, d in enumerate(s.shape) if isinstance(d, str) and axis > 0})
    batch_dynamic = any(s.shape and isinstance(s.shape[0], str) for s in specs)
    batch_list = list(batches) if batch_dynamic else [_fixed_batch(specs)]
    size_sets: list[dict[str, int]] = [dict.fromkeys(symbols, size) for size in dim_sizes] if symbols else [{}]
    cases = []
    for i, batch in enumerate(batch_list):
        for j, dims in enumerate(size_sets):
            feeds = example_inputs(specs, batch, dims=dims, seed=seed + 31 * i + j)
            cases.append(InputCase(feeds=feeds, batch=batch, dims=dims))
    return cases


def sample_cases(sample: Mapping[str, np.ndarray], *, batches: Sequence[int] = (1, 32)) -> list[InputCase]:
    """Cases cut from the user's sample data: its first row, and up to ``batches[-1]`` rows."""
    n = min(len(v) for v in sample.values())
    sizes = sorted({min(b, n) for b in batches})
    return [InputCase(feeds={k: np.asarray(v)[:b] for k, v in sample.items()}, batch=b) for b in sizes]


def _fixed_batch(specs: Sequence[TensorSpec]) -> int:
    first = specs[0].shape[0] if specs and specs[0].shape else 1
    return first if isinstance(first, int) else 1


def _compare(name: str, ref: np.ndarray, got: np.ndarray, tol: tuple[float, float] | None) -> OutputParity:
    """Numeric comparison within ``tol`` = (atol, rtol); ``None`` means exact (integers, bools, strings)."""
    exact = tol is None
    atol, rtol = (0.0, 0.0) if tol is None else tol
    if exact:
        equal = bool(np.array_equal(ref, got))
        return OutputParity(
            output=name, max_abs_error=0.0 if equal else float("inf"), max_rel_error=0.0 if equal else float("inf"),
            atol=0.0, rtol=0.0, exact=True, passed=equal,
        )  # fmt: skip
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    diff = np.abs(r - g)
    both_nan = np.isnan(r) & np.isnan(g)
    diff = np.where(both_nan, 0.0, diff)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    max_rel = float(np.nanmax(diff / np.maximum(np.abs(r), 1e-12))) if diff.size else 0.0
    passed = bool(np.all((diff <= atol + rtol * np.abs(r)) | both_nan))
    return OutputParity(
        output=name, max_abs_error=max_abs, max_rel_error=max_rel, atol=atol, rtol=rtol, exact=False, passed=passed
    )


def prove_parity(
    reference: Reference,
    onnx_model: bytes | str,
    outputs: Sequence[TensorSpec],
    cases: Sequence[InputCase],
    *,
    reference_name: str,
    data: Literal["sample", "generated"],
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    source: str | None = None,
    fuse_int8: bool = True,
) -> ParityRecord:
    """Compare ``reference`` with the ONNX model on every case; raise one ParityError listing every mismatch.

    ``reference`` maps input arrays to output arrays keyed by the ONNX output names. ``onnx_model`` is
    the serialized model or a path to it. ``fuse_int8=False`` runs int8 QDQ unfused, as the engine does on a
    CPU whose fused int8 kernels would saturate (see ``slipstream.runtime.targets.int8_fusion``).
    """
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not fuse_int8:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.log_severity_level = 4  # run failures are reported in the ParityError, not logged to stderr as well
    session = ort.InferenceSession(onnx_model, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in outputs]
    first_label = cases[0].label() if cases else ""
    mismatches: list[str] = []
    results: list[ParityCase] = []
    seen: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for case in cases:
        expected = reference(case.feeds)
        try:
            got = dict(zip(names, session.run(names, dict(case.feeds)), strict=True))
        except Exception as exc:  # onnxruntime errors are untyped
            first_line = str(exc).strip().splitlines()[0]
            baked = " An axis may have been baked in as a constant at export." if case.label() != first_label else ""
            mismatches.append(f"[{case.label()}] onnxruntime failed to run the model: {first_line}.{baked}")
            continue
        compared: list[OutputParity] = []
        for spec in outputs:
            ref = np.asarray(expected[spec.name])
            out = np.asarray(got[spec.name])
            seen[spec.name].append(ref)
            if ref.shape != out.shape:
                mismatches.append(
                    f"[{case.label()}] output '{spec.name}' has shape {list(out.shape)}, the source gives "
                    f"{list(ref.shape)}; a dynamic axis was probably baked in as a constant at export."
                )
                continue
            result = _compare(spec.name, ref, out, tol.get(spec.dtype))
            compared.append(result)
            if not result.passed:
                detail = (
                    "values differ"
                    if result.exact
                    else f"max abs error {result.max_abs_error:.3g} (atol {result.atol:g}, rtol {result.rtol:g}), "
                    f"max rel error {result.max_rel_error:.3g}"
                )
                mismatches.append(f"[{case.label()}] output '{spec.name}': {detail}")
        results.append(ParityCase(batch=case.batch, dims=dict(case.dims), outputs=tuple(compared)))
    if mismatches:
        generated = (
            "The inputs were generated (masks all ones, integers within each input's recorded range, floats "
            "standard normal); if the model needs realistic values, prove it on real ones with --sample. "
            if data == "generated"
            else ""
        )
        raise ParityError(
            mismatches,
            source=source,
            hint=generated + "Check that the model is in eval mode and deterministic; try another opset or exporter "
            "(--exporter torchscript / --opset N); widen the tolerance only if the difference is expected; "
            "--skip-parity writes the bundle without a proof (recorded in the manifest).",
        )
    constant = [n for n in names if _constant(seen[n], tol.get(_dtype_of(outputs, n)))]
    warnings = tuple(_not_informative(n, len(cases), data) for n in constant)
    return ParityRecord(
        status="passed", reference=reference_name, data=data, cases=tuple(results),
        informative=not constant, warnings=warnings,
    )  # fmt: skip


def _dtype_of(outputs: Sequence[TensorSpec], name: str) -> str:
    return next(o.dtype for o in outputs if o.name == name)


def _constant(values: Sequence[np.ndarray], tol: tuple[float, float] | None) -> bool:
    """Whether an output took one value (within its parity tolerance) for every input row it was given.

    Rows are compared along the batch axis, across all cases whose rows have the same shape. One row in all
    gives no evidence either way, so it is not called constant.
    """
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for v in values:
        if v.ndim == 0 or v.dtype.kind not in "biuf":
            return False  # scalars and strings: no rows to compare
        by_shape.setdefault(v.shape[1:], []).append(v.reshape(len(v), -1))
    groups = [np.concatenate(g) for g in by_shape.values()]
    if sum(len(g) for g in groups) < 2 or any(g.shape[1] == 0 for g in groups):
        return False
    for rows in groups:
        if tol is None or rows.dtype.kind in "biu":
            if not np.all(rows == rows[:1]):
                return False
            continue
        r = rows.astype(np.float64)
        spread = r.max(axis=0) - r.min(axis=0)  # NaN spread compares False: an all-NaN output is constant too
        atol, rtol = tol
        if np.any(spread > atol + rtol * np.abs(r[0])):
            return False
    return True


def _not_informative(name: str, cases: int, data: str) -> str:
    return (
        f"parity is not informative: output '{name}' was the same for every input ({cases} {data} input sets), "
        "so a wrong conversion that gives that constant would pass too. Pass real inputs with --sample "
        "(an .npz with one array per model input; sample= in Python) to prove parity on data that moves the output."
    )


def skipped(reference_name: str, reason: str) -> ParityRecord:
    """The record a conversion carries when the user asked to skip the proof."""
    return ParityRecord(status="skipped", reference=reference_name, data="none", reason=reason)
