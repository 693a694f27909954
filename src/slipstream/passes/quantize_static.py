"""quantize.static: int8 weights and activations, with scales calibrated on data.

QDQ is the default format (onnxruntime fuses the Q/DQ pairs into integer kernels at load); QOperator
writes QLinearConv/QLinearMatMul directly. Calibration reads a user ``.npz`` whose arrays are named like
the model's inputs; without one it generates data from the input specs, and the manifest says plainly
that the scales did not come from real data. A model that takes token ids (integer inputs) is refused
without real data: random ids give activation ranges nothing like real text (MiniLM calibrated that way
kept a cosine of 0.457 to fp32), so there is no useful generated fallback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import Field, JsonValue

from slipstream.artifact.hashing import sha256_file
from slipstream.artifact.tensor import TensorSpec
from slipstream.data.synthetic import example_inputs
from slipstream.errors import DataError
from slipstream.passes._onnx import load, op_histogram
from slipstream.passes._quant import fused_warning, preprocess
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.fidelity import load_inputs, measure_fidelity
from slipstream.passes.tolerance import Tolerance
from slipstream.runtime.targets import has_int8_dot_product

GENERATED_NOTE = (
    "calibrated on GENERATED data (random values shaped like the inputs), not real data: activation "
    "ranges may be wrong; pass data=FILE.npz with real samples"
)
FIDELITY_SAMPLES = 64
# Integer inputs are token ids (or category codes): generated values say nothing about real activations.
TOKEN_DTYPES = frozenset({"int32", "int64"})


class QuantizeStaticConfig(PassConfig):
    format: Literal["qdq", "qoperator"] = Field(default="qdq", description="QDQ pairs or integer operators.")
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax", description="How activation ranges are chosen from the calibration data."
    )
    percentile: float = Field(default=99.999, gt=50, le=100, description="Percentile kept by 'percentile'.")
    data: str | None = Field(
        default=None, description="An .npz file with one array per model input, named like the inputs."
    )
    num_samples: int = Field(default=128, ge=1, description="Samples to calibrate on (generated or from data).")
    batch_size: int = Field(default=32, ge=1, description="Calibration batch size.")
    per_channel: bool = Field(default=True, description="One weight scale per output channel.")
    reduce_range: bool | Literal["auto"] = Field(
        default="auto",
        description="7-bit weights: 'auto' takes them on a CPU without VNNI/AMX, whose int8 kernels saturate "
        "with 8-bit weights (the choice is recorded).",
    )
    activation_type: Literal["quint8", "qint8"] = Field(default="quint8", description="Activation element type.")
    weight_type: Literal["qint8", "quint8"] = Field(default="qint8", description="Weight element type.")
    op_types: tuple[str, ...] = Field(default=(), description="Operator types to quantize; empty = default set.")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="Node names to leave in fp32.")


class _Reader:
    """An onnxruntime CalibrationDataReader over in-memory arrays, in batches of one size.

    A shorter last batch is left out (when there is a full one): onnxruntime's histogram calibrators (entropy,
    percentile, distribution) stack every batch's activations into one array and fail on a ragged last one
    ("setting an array element with a sequence ... inhomogeneous shape", seen on MiniLM's 126 sentences)."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int) -> None:
        n = min(len(a) for a in arrays.values())
        size = max(1, min(batch_size, n))
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, n - size + 1, size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_arrays(
    who: str, data: str | None, ctx: PassContext, specs: Sequence[TensorSpec], num_samples: int
) -> tuple[dict[str, np.ndarray], str]:
    """The calibration inputs of pass ``who`` and where they came from: ``data`` (a file), else the recipe's
    data, else generated values, which are refused for integer (token id) inputs: scales calibrated on random
    ids are wrong (MiniLM calibrated so: cosine 0.457 to fp32)."""
    if data is not None:
        return load_inputs(Path(data), specs, num_samples), f"file {data}"
    if ctx.data is not None:
        return {k: v[:num_samples] for k, v in ctx.data.items()}, f"recipe data {ctx.data_source}"
    tokens = [f"{s.name} ({s.dtype})" for s in specs if s.dtype in TOKEN_DTYPES]
    if tokens:
        raise DataError(
            f"{who} needs real calibration data for a model with token inputs; the model takes "
            f"{', '.join(tokens)} and no data was given, so only generated ids were at hand. Scales calibrated "
            "on random ids are wrong (MiniLM calibrated so: cosine 0.457 to fp32).",
            source="generated",
            hint=f"Give calibration data: {who}:data=FILE.npz with tokenized real text (one array per input, "
            "named like the inputs), or the recipe's data; or use quantize.dynamic, which needs none.",
        )
    return example_inputs(specs, num_samples, seed=ctx.seed), "generated"


def _reduce_range(config: QuantizeStaticConfig) -> bool:
    return not has_int8_dot_product() if config.reduce_range == "auto" else config.reduce_range


class QuantizeStatic(OnnxPass[QuantizeStaticConfig]):
    name = "quantize.static"
    version = 1
    Config = QuantizeStaticConfig
    tolerance = Tolerance(max_rel_error=0.2, min_top1=0.95)  # int8, calibrated: as quantize.dynamic

    def fingerprint_inputs(self, config: QuantizeStaticConfig) -> dict[str, JsonValue]:
        # 'auto' resolves per CPU, so a cache shared by two machines keeps one result for each choice.
        keyed: dict[str, JsonValue] = {"reduce_range": _reduce_range(config)}
        if config.data is None:
            return keyed
        path = Path(config.data)
        if path.is_file():
            return {**keyed, "data_sha256": sha256_file(path)}
        # A 'file.py:fn' callable: key on the reference and the code that produces the data.
        code = Path(config.data.rpartition(":")[0])
        return {**keyed, "data_ref": config.data, "data_sha256": sha256_file(code) if code.is_file() else None}

    def apply(self, model: onnx.ModelProto, config: QuantizeStaticConfig, ctx: PassContext) -> PassOutput:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        specs = ctx.bundle.manifest.inputs
        arrays, source = calibration_arrays(self.name, config.data, ctx, specs, config.num_samples)
        prepared, pre = preprocess(model, ctx.workdir)
        src = ctx.workdir / "prepared.onnx"
        onnx.save_model(prepared, str(src))
        out = ctx.workdir / "quantized.onnx"
        qtype = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
        extra: dict[str, object] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        if config.calibration == "percentile":
            extra["CalibPercentile"] = config.percentile
        quantize_static(
            str(src),
            str(out),
            _Reader(arrays, config.batch_size),
            quant_format=QuantFormat.QDQ if config.format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(config.op_types) or None,
            per_channel=config.per_channel,
            reduce_range=_reduce_range(config),
            activation_type=qtype[config.activation_type],
            weight_type=qtype[config.weight_type],
            nodes_to_exclude=list(config.nodes_to_exclude) or None,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[config.calibration],
            extra_options=extra,
            calibration_cache_path=ctx.workdir / "calibration",
        )
        result = load(out)
        after = op_histogram(result)
        samples = min(len(a) for a in arrays.values())
        resolved: dict[str, JsonValue] = {
            "format": config.format,
            "calibration": config.calibration,
            "calibration_data": source,
            "calibration_samples": samples,
            "per_channel": config.per_channel,
            "reduce_range": _reduce_range(config),
            "reduce_range_why": (
                "set in the config"
                if config.reduce_range != "auto"
                else "auto: this CPU has an int8 dot product (VNNI/AMX)"
                if has_int8_dot_product()
                else "auto: this CPU has no VNNI/AMX, so 8-bit weights would saturate its int8 kernels"
            ),
            "activation_type": config.activation_type,
            "weight_type": config.weight_type,
            "preprocess": pre,
        }
        warnings: list[str] = []
        if source == "generated":
            resolved["calibration_note"] = GENERATED_NOTE
            warnings.append(GENERATED_NOTE)
        if (hidden := fused_warning(model)) is not None:
            warnings.append(hidden)
        quant_ops: dict[str, JsonValue] = {k: v for k, v in after.items() if "Quantize" in k or k.startswith("QLinear")}
        if not quant_ops:
            warnings.append("nothing was quantized: the graph has no operator static int8 applies to.")
        metrics: dict[str, JsonValue] = {"quantization_ops": quant_ops, "nodes_out": sum(after.values())}
        if config.data is not None and ctx.data is None:
            # Generated normal noise says little about a model calibrated on real data: compare on the data.
            feeds = {k: v[:FIDELITY_SAMPLES] for k, v in arrays.items()}
            metrics["fidelity"] = measure_fidelity(model, result, specs, ctx.seed, feeds, f"calibration {source}")
        return PassOutput(model=result, resolved=resolved, metrics=metrics, warnings=warnings)
