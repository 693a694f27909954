"""quantize.dynamic: int8 weights; activations are quantized at run time.

Measured on this machine: on a CNN, dynamic int8 turns Conv into ConvInteger, which runs about 7×
slower than fp32, so the pass warns whenever it quantizes a Conv. On transformers (MatMul-heavy) it
is the fastest int8 variant, and per-channel weights are needed for good fidelity (cosine 0.993 vs
0.965 per-tensor on MiniLM), hence the default.
"""

from __future__ import annotations

from typing import Literal

import onnx
from pydantic import Field, JsonValue

from slipstream.passes._onnx import load, op_histogram
from slipstream.passes._quant import fused_warning, has_contrib_ops, preprocess
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.tolerance import Tolerance

CONV_WARNING = (
    "quantized {n} Conv node(s) to ConvInteger, which on this CPU runs about 7× SLOWER than fp32. "
    "Use quantize.static for convolutional models, or pass op_types=[MatMul,Gemm] to leave Conv in fp32."
)


QATTENTION = "com.microsoft.QAttention"  # as op_histogram names a contrib op


class QuantizeDynamicConfig(PassConfig):
    weight_type: Literal["qint8", "quint8"] = Field(default="qint8", description="Element type of the weights.")
    per_channel: bool = Field(default=True, description="One scale per output channel (much better fidelity).")
    reduce_range: bool = Field(
        default=False, description="7-bit weights; only for CPUs without VNNI (it hurts accuracy on VNNI)."
    )
    op_types: tuple[str, ...] = Field(
        default=(), description="Operator types to quantize; empty means onnxruntime's default set."
    )
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="Node names to leave in fp32.")
    matmul_const_b_only: bool = Field(
        default=False,
        description="Quantize only MatMuls with a constant weight; activation × activation MatMuls (attention "
        "scores) stay fp32.",
    )


class QuantizeDynamic(OnnxPass[QuantizeDynamicConfig]):
    name = "quantize.dynamic"
    version = 1
    Config = QuantizeDynamicConfig
    # int8: elementwise error is a few percent of the output scale; the predicted class stays.
    tolerance = Tolerance(max_rel_error=0.2, min_top1=0.95)

    def apply(self, model: onnx.ModelProto, config: QuantizeDynamicConfig, ctx: PassContext) -> PassOutput:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fused = has_contrib_ops(model)
        prepared, pre = preprocess(model, ctx.workdir)
        src = ctx.workdir / "prepared.onnx"
        onnx.save_model(prepared, str(src))
        out = ctx.workdir / "quantized.onnx"
        quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=list(config.op_types) or None,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            weight_type=QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8,
            nodes_to_exclude=list(config.nodes_to_exclude) or None,
            # A graph already fused by graph.optimize has contrib ops whose output types the quantizer
            # cannot infer; without a default type it fails on them.
            extra_options={
                "DefaultTensorType": onnx.TensorProto.FLOAT,
                "MatMulConstBOnly": config.matmul_const_b_only,
            },
        )
        result = load(out)
        before, after = op_histogram(model), op_histogram(result)
        warnings: list[str] = []
        if (hidden := fused_warning(model)) is not None:
            warnings.append(hidden)
        n_conv = after.get("ConvInteger", 0)
        if n_conv:
            warnings.append(CONV_WARNING.format(n=n_conv))
        resolved: dict[str, JsonValue] = {
            "weight_type": config.weight_type,
            "per_channel": config.per_channel,
            "reduce_range": config.reduce_range,
            "op_types": list(config.op_types) or "onnxruntime default",
            "preprocess": pre,
            "input_was_fused": fused,
            "matmul_const_b_only": config.matmul_const_b_only,
        }
        if n_qattention := after.get(QATTENTION, 0):
            # A fused Attention (graph.optimize) becomes QAttention: one integer GEMM for Q, K and V; the
            # scores and the weighted sum stay fp32 inside it.
            resolved["fused_attention"] = f"{n_qattention} QAttention"
        metrics: dict[str, JsonValue] = {
            "integer_ops": {k: v for k, v in after.items() if "Integer" in k or "Quantize" in k or k == QATTENTION},
            "fp32_matmul_left": after.get("MatMul", 0),
            "fp32_conv_left": after.get("Conv", 0),
            "nodes_in": sum(before.values()),
            "nodes_out": sum(after.values()),
        }
        if not metrics["integer_ops"]:
            warnings.append("nothing was quantized: the graph has no operator dynamic int8 applies to.")
        return PassOutput(model=result, resolved=resolved, metrics=metrics, warnings=warnings)
