"""graph.optimize: onnxruntime's offline graph optimization, plus transformer fusions for BERT-like graphs.

The fusions are onnxruntime.transformers' (LayerNorm, Gelu, ...) preceded by our own self-attention fusion
(passes/_attention.py), which matches the torch dynamo exports theirs misses: quantize.dynamic after it
makes QAttention, one integer GEMM for Q, K and V.
"""

from __future__ import annotations

from typing import Literal

import onnx
from pydantic import Field, JsonValue

from slipstream.passes._attention import fuse_attention
from slipstream.passes._onnx import load, op_histogram, save
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.tolerance import Tolerance

# Folding a packed weight back into fp32 makes the file much larger; below this, growth is noise.
GROWTH_WARNING = 1.5


class GraphOptimizeConfig(PassConfig):
    level: Literal["basic", "extended", "all"] = Field(
        default="extended",
        description="onnxruntime optimization level. 'all' adds layout changes tied to this CPU's instruction set.",
    )
    transformer_fusions: Literal["auto", "bert", "off"] = Field(
        default="auto",
        description="Run onnxruntime.transformers fusions (LayerNorm, Gelu, Attention...); 'auto' when the "
        "graph looks like a transformer (Softmax and LayerNormalization present).",
    )
    attention: bool = Field(
        default=True,
        description="With the fusions: fuse self-attention blocks into com.microsoft Attention first (the "
        "mask checked by a probe run; blocks that do not match stay as they are).",
    )
    num_heads: int = Field(default=0, ge=0, description="Attention heads for the fusions; 0 detects them.")
    hidden_size: int = Field(default=0, ge=0, description="Hidden size for the fusions; 0 detects it.")


def looks_like_transformer(model: onnx.ModelProto) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "Softmax" in ops and ("LayerNormalization" in ops or "ReduceMean" in ops)


class GraphOptimize(OnnxPass[GraphOptimizeConfig]):
    name = "graph.optimize"
    version = 1
    Config = GraphOptimizeConfig
    # Fusion and constant folding reorder float32 arithmetic only.
    tolerance = Tolerance(max_rel_error=1e-5)

    def apply(self, model: onnx.ModelProto, config: GraphOptimizeConfig, ctx: PassContext) -> PassOutput:
        import onnxruntime as ort

        before = op_histogram(model)
        fusions: dict[str, JsonValue] = {}
        attention_note, n_attention = "off", 0
        use_fusions = config.transformer_fusions == "bert" or (
            config.transformer_fusions == "auto" and looks_like_transformer(model)
        )
        if use_fusions:
            from onnxruntime.transformers.optimizer import optimize_model

            if config.attention:
                model, n_attention, attention_note = fuse_attention(model)
            optimized = optimize_model(
                model, model_type="bert", num_heads=config.num_heads, hidden_size=config.hidden_size, opt_level=0
            )
            stats = optimized.get_fused_operator_statistics()
            fusions = {k: int(v) for k, v in sorted(stats.items()) if int(v) > 0}
            if n_attention:
                fusions["Attention"] = n_attention
            model = optimized.model
        src = save(model, ctx.workdir / "in.onnx")
        out = ctx.workdir / "out.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[config.level]
        opts.optimized_model_filepath = str(out)
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        result = load(out)
        after = op_histogram(result)
        changed = {op: after.get(op, 0) - before.get(op, 0) for op in sorted(set(before) | set(after))}
        resolved: dict[str, JsonValue] = {
            "level": config.level,
            "transformer_fusions": "bert" if use_fusions else "off",
            "fused_operators": fusions,
            "attention_fusion": attention_note,
        }
        notes = []
        if config.level == "all":
            notes.append("level 'all' may write CPU-specific layouts (NCHWc); run the bundle on the same kind of CPU")
        if notes:
            resolved["notes"] = list(notes)
        warnings: list[str] = []
        if result.ByteSize() > GROWTH_WARNING * model.ByteSize():
            warnings.append(
                f"the model grew from {model.ByteSize():,} to {result.ByteSize():,} bytes: constant folding "
                "unpacked compressed weights (e.g. weights.binarize). Run graph.optimize before such passes."
            )
        metrics: dict[str, JsonValue] = {
            "nodes_in": sum(before.values()),
            "nodes_out": sum(after.values()),
            "op_changes": {k: v for k, v in changed.items() if v},
        }
        return PassOutput(model=result, resolved=resolved, metrics=metrics, warnings=warnings)
