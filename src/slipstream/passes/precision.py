"""precision.fp16: fp16 weights and compute, inputs and outputs kept fp32.

Measured on this machine: fp16 halves the file but brings no speed on this CPU (onnxruntime's CPU
provider has few fp16 kernels and casts around the rest); it pays off on GPUs. The manifest says so.
"""

from __future__ import annotations

import onnx
from pydantic import Field, JsonValue

from slipstream.passes._onnx import op_histogram, toposort
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.tolerance import Tolerance

CPU_NOTE = "fp16 saves size, not time, on this CPU (no speed-up was measured here); the gain in speed is on GPUs"


class Float16Config(PassConfig):
    op_block_list: tuple[str, ...] = Field(
        default=(),
        description="Extra operator types kept in fp32 (numerically sensitive ones), added to onnxruntime's "
        "default block list.",
    )
    node_block_list: tuple[str, ...] = Field(default=(), description="Node names kept in fp32.")
    keep_io_types: bool = Field(default=True, description="Keep graph inputs and outputs in fp32.")


class Float16(OnnxPass[Float16Config]):
    name = "precision.fp16"
    version = 1
    Config = Float16Config
    # fp16 keeps ~3 significant digits; inputs and outputs stay fp32.
    tolerance = Tolerance(max_rel_error=1e-2)

    def apply(self, model: onnx.ModelProto, config: Float16Config, ctx: PassContext) -> PassOutput:
        # onnxconverter-common's converter breaks torch-exported BERT (a Cast type error at load);
        # onnxruntime's own converter does not.
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        block = sorted({*DEFAULT_OP_BLOCK_LIST, *config.op_block_list})
        result = convert_float_to_float16(
            model,
            keep_io_types=config.keep_io_types,
            op_block_list=block,
            node_block_list=list(config.node_block_list) or None,
        )
        toposort(result)  # the converter appends the io Casts at the end of the node list
        fp16 = sum(1 for t in result.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        fp32 = sum(1 for t in result.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        resolved: dict[str, JsonValue] = {
            "keep_io_types": config.keep_io_types,
            "op_block_list_extra": list(config.op_block_list),
            "note": CPU_NOTE,
        }
        metrics: dict[str, JsonValue] = {
            "fp16_initializers": fp16,
            "fp32_initializers_left": fp32,
            "casts_added": op_histogram(result).get("Cast", 0) - op_histogram(model).get("Cast", 0),
        }
        return PassOutput(model=result, resolved=resolved, metrics=metrics)
