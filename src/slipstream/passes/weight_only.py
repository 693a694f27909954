"""weights.int4: 4-bit block-quantized MatMul weights (onnxruntime's MatMulNBits).

The quantizer rewrites MatMul only, and dynamo exports 2-D Linear layers as Gemm, so on an MLP it
silently quantizes nothing (seen here). This pass first rewrites each Gemm with a constant weight
into MatMul (+ Add for the bias), then quantizes.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field, JsonValue

from slipstream.passes._onnx import op_histogram
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.tolerance import Tolerance


class Int4WeightsConfig(PassConfig):
    block_size: Literal[16, 32, 64, 128, 256] = Field(default=32, description="Weights per quantization block.")
    symmetric: bool = Field(default=True, description="Symmetric blocks (no zero point).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        default=4, description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest here)."
    )
    rewrite_gemm: bool = Field(default=True, description="Turn Gemm with a constant weight into MatMul first.")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="MatMul node names to leave in fp32.")


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(a.f if a.type == onnx.AttributeProto.FLOAT else a.i)
    return default


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, W, C) with constant W, alpha=beta=1, transA=0 as MatMul(A, W') [+ Add C]."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in model.graph.node:
        ok = (
            node.op_type == "Gemm"
            and not node.domain
            and node.input[1] in inits
            and _attr(node, "alpha", 1.0) == 1.0
            and _attr(node, "beta", 1.0) == 1.0
            and _attr(node, "transA", 0) == 0
        )
        if not ok:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if _attr(node, "transB", 0):
            weight = np.ascontiguousarray(weight.T)
        wname = f"{node.input[1]}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(weight, wname))
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{out}_matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=f"{node.name or out}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name or out}_Add"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return rewritten


def import_matmul_nbits() -> Any:
    """Import onnxruntime's MatMulNBitsQuantizer without its side effect on the caller's logging.

    The module calls ``logging.basicConfig(level=INFO)`` at import, which turns on every INFO message
    of every library in the process (the int8 quantizers log each node). Undo it.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


class Int4Weights(OnnxPass[Int4WeightsConfig]):
    name = "weights.int4"
    version = 1
    Config = Int4WeightsConfig
    tolerance = Tolerance(max_rel_error=0.2, min_top1=0.95)  # 4-bit blocks with fp32 scales

    def apply(self, model: onnx.ModelProto, config: Int4WeightsConfig, ctx: PassContext) -> PassOutput:
        MatMulNBitsQuantizer = import_matmul_nbits()  # noqa: N806 (a class)

        rewritten = gemm_to_matmul(model) if config.rewrite_gemm else 0
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level,
            nodes_to_exclude=list(config.nodes_to_exclude),
        )
        quantizer.process()
        result: onnx.ModelProto = quantizer.model.model
        after = op_histogram(result)
        quantized = after.get("com.microsoft.MatMulNBits", 0)
        warnings: list[str] = []
        if quantized == 0:
            warnings.append("no MatMul was quantized to int4: the graph has no MatMul with a constant weight.")
        resolved: dict[str, JsonValue] = {
            "bits": 4,
            "block_size": config.block_size,
            "symmetric": config.symmetric,
            "accuracy_level": config.accuracy_level,
            "gemm_rewritten_to_matmul": rewritten,
        }
        metrics: dict[str, JsonValue] = {"matmul_nbits": quantized, "fp32_matmul_left": after.get("MatMul", 0)}
        return PassOutput(model=result, resolved=resolved, metrics=metrics, warnings=warnings)
