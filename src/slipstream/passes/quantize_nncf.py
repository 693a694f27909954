"""quantize.nncf: int8 QDQ by NNCF post-training quantization, calibrated on real data (for OpenVINO).

NNCF (OpenVINO's compression framework) quantizes the ONNX model itself and writes QDQ pairs where
OpenVINO's int8 kernels want them; its ``transformer`` model type keeps the attention's sensitive parts
(softmax, layer norms, the residual adds) in float. Calibration needs real data: the pass takes the
``data`` file (the build gives its recipe's calibration data) or the recipe data. Without either, a model
with float inputs calibrates on generated values and says so (a warning and ``calibration_note``); a model
with token inputs is refused (generated ids give garbage scales: MiniLM calibrated that way kept a cosine of
0.457 to fp32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import Field, JsonValue

from slipstream.artifact.hashing import sha256_file
from slipstream.passes._onnx import op_histogram
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.quantize_static import calibration_arrays
from slipstream.passes.tolerance import Tolerance

GENERATED_NOTE = (
    "calibrated on GENERATED data (random values shaped like the inputs), not real data: activation "
    "ranges may be wrong; pass data=FILE.npz with real samples"
)


class QuantizeNncfConfig(PassConfig):
    data: str | None = Field(
        default=None, description="An .npz (or .csv, .parquet, file.py:fn) of real inputs, named like the inputs."
    )
    num_samples: int = Field(default=128, ge=1, description="Samples to calibrate on.")
    preset: Literal["performance", "mixed"] = Field(
        default="performance", description="Symmetric activations (performance) or asymmetric ones (mixed)."
    )
    model_type: Literal["auto", "transformer", "other"] = Field(
        default="auto", description="'transformer' keeps attention's sensitive ops in float; auto: by op types."
    )
    fast_bias_correction: bool = Field(default=True, description="NNCF's fast bias correction.")


def _is_transformer(model: onnx.ModelProto) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "Softmax" in ops and ("LayerNormalization" in ops or "ReduceMean" in ops) and "MatMul" in ops


class QuantizeNncf(OnnxPass[QuantizeNncfConfig]):
    name = "quantize.nncf"
    version = 1
    Config = QuantizeNncfConfig
    tolerance = Tolerance(max_rel_error=0.2, min_top1=0.95)  # int8, calibrated: as quantize.static

    def fingerprint_inputs(self, config: QuantizeNncfConfig) -> dict[str, JsonValue]:
        if config.data is not None and Path(config.data).is_file():
            return {"data_sha256": sha256_file(Path(config.data))}
        return {"data_ref": config.data}

    def apply(self, model: onnx.ModelProto, config: QuantizeNncfConfig, ctx: PassContext) -> PassOutput:
        import nncf

        specs = ctx.bundle.manifest.inputs
        arrays, source = calibration_arrays(self.name, config.data, ctx, specs, config.num_samples)
        n = min(len(a) for a in arrays.values())
        items = [{k: np.ascontiguousarray(v[i : i + 1]) for k, v in arrays.items()} for i in range(n)]
        transformer = config.model_type == "transformer" or (config.model_type == "auto" and _is_transformer(model))
        result = nncf.quantize(
            model,
            nncf.Dataset(items),
            preset=nncf.QuantizationPreset.PERFORMANCE
            if config.preset == "performance"
            else nncf.QuantizationPreset.MIXED,
            model_type=nncf.ModelType.TRANSFORMER if transformer else None,
            subset_size=n,
            fast_bias_correction=config.fast_bias_correction,
        )
        after = op_histogram(result)
        quant_ops: dict[str, JsonValue] = {k: v for k, v in after.items() if "Quantize" in k}
        warnings = [] if quant_ops else ["nothing was quantized: NNCF found no operator to quantize."]
        if source == "generated":
            warnings.append(GENERATED_NOTE)
        resolved: dict[str, JsonValue] = {
            "calibration_data": source,
            "calibration_samples": n,
            "preset": config.preset,
            "model_type": "transformer" if transformer else "other",
            "nncf": nncf.__version__,
        }
        metrics: dict[str, JsonValue] = {"quantization_ops": quant_ops, "nodes_out": sum(after.values())}
        if source == "generated":
            resolved["calibration_note"] = GENERATED_NOTE
        return PassOutput(model=result, resolved=resolved, metrics=metrics, warnings=warnings)
