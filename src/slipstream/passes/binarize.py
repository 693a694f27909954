"""weights.binarize: 1-bit sign weights with one scale per output channel, stored bit-packed.

Each chosen weight W becomes sign(W) · mean(|W|) over its output channel. The signs are stored as
packed bits (uint8, 8 weights per byte) plus fp32 scales; a small constant subgraph (BitShift, Cast,
Mul) unpacks them, and onnxruntime folds it into a plain fp32 initializer when the session loads.
So this is storage compression (~32× on the binarized layers), not faster compute, and it costs
accuracy: the pass reports the fidelity hit, which is large on small models.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field, JsonValue

from slipstream.errors import ConfigError
from slipstream.passes._onnx import find_weights, opset
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.tolerance import Tolerance

MIN_OPSET = 11  # BitShift


class BinarizeWeightsConfig(PassConfig):
    op_types: tuple[str, ...] = Field(
        default=("MatMul", "Gemm", "Conv"), description="Operators whose constant weights are binarized."
    )
    min_elements: int = Field(default=1024, ge=8, description="Leave weights smaller than this in fp32.")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="Node names whose weights stay fp32.")


def binarize(array: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed sign bits, per-channel scale shaped to broadcast against ``array``)."""
    axes = tuple(i for i in range(array.ndim) if i != channel_axis)
    scale = np.abs(array).mean(axis=axes, keepdims=True).astype(np.float32)
    bits = (array >= 0).astype(np.uint8).ravel()
    return np.packbits(bits), scale


def _const(name: str, value: object, dtype: type) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def unpack_subgraph(
    n: str, packed: str, scale: str, shape: tuple[int, ...]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (and their constants) that rebuild weight ``n`` from its sign bits and scale."""
    size = int(np.prod(shape))
    consts = [
        _const(f"{n}__col", [-1, 1], np.int64),
        _const(f"{n}__shifts", np.arange(8), np.uint8),
        _const(f"{n}__seven", [7], np.uint8),
        _const(f"{n}__two", 2.0, np.float32),
        _const(f"{n}__one", 1.0, np.float32),
        _const(f"{n}__start", [0], np.int64),
        _const(f"{n}__end", [size], np.int64),
        _const(f"{n}__axis", [1], np.int64),
        _const(f"{n}__shape", list(shape), np.int64),
    ]
    nodes = [
        helper.make_node("Reshape", [packed, f"{n}__col"], [f"{n}__bytes"]),
        # bit k of each byte, MSB first as np.packbits writes it: (byte << k) >> 7, all in uint8.
        helper.make_node("BitShift", [f"{n}__bytes", f"{n}__shifts"], [f"{n}__l"], direction="LEFT"),
        helper.make_node("BitShift", [f"{n}__l", f"{n}__seven"], [f"{n}__bits"], direction="RIGHT"),
        helper.make_node("Flatten", [f"{n}__bits"], [f"{n}__row"], axis=0),
        helper.make_node("Cast", [f"{n}__row"], [f"{n}__f"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [f"{n}__f", f"{n}__two"], [f"{n}__2b"]),
        helper.make_node("Sub", [f"{n}__2b", f"{n}__one"], [f"{n}__pm"]),
        helper.make_node("Slice", [f"{n}__pm", f"{n}__start", f"{n}__end", f"{n}__axis"], [f"{n}__cut"]),
        helper.make_node("Reshape", [f"{n}__cut", f"{n}__shape"], [f"{n}__signs"]),
        helper.make_node("Mul", [f"{n}__signs", scale], [n]),
    ]
    return nodes, consts


class BinarizeWeights(OnnxPass[BinarizeWeightsConfig]):
    name = "weights.binarize"
    version = 1
    Config = BinarizeWeightsConfig
    # One bit per weight loses much; the promise is only agreement well above chance on a trained model.
    tolerance = Tolerance(min_top1=0.5)

    def apply(self, model: onnx.ModelProto, config: BinarizeWeightsConfig, ctx: PassContext) -> PassOutput:
        if opset(model) < MIN_OPSET:
            raise ConfigError(
                f"weights.binarize needs opset {MIN_OPSET} or later (BitShift); the model has {opset(model)}.",
                field="weights.binarize",
                hint="Re-export with a newer opset.",
            )
        weights = find_weights(model, config.op_types, config.min_elements, config.nodes_to_exclude)
        chosen = {w.name: w for w in weights}
        keep = [t for t in model.graph.initializer if t.name not in chosen]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        unpack: list[onnx.NodeProto] = []
        bytes_before = bytes_after = 0
        for w in weights:
            packed, scale = binarize(w.array, w.channel_axis)
            p, s = f"{w.name}__signbits", f"{w.name}__scale"
            model.graph.initializer.extend([numpy_helper.from_array(packed, p), numpy_helper.from_array(scale, s)])
            nodes, consts = unpack_subgraph(w.name, p, s, tuple(w.array.shape))
            unpack += nodes
            model.graph.initializer.extend(consts)
            bytes_before += w.array.nbytes
            bytes_after += packed.nbytes + scale.nbytes
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(unpack + nodes)
        warnings: list[str] = []
        if not weights:
            warnings.append(
                f"no weight was binarized: none of {list(config.op_types)} has one of {config.min_elements}+ elements."
            )
        resolved: dict[str, JsonValue] = {
            "binarized": [w.name for w in weights],
            "storage": "packed sign bits (uint8) + fp32 per-output-channel scale; unpacked at session load",
            "note": "storage compression, not faster compute; expect an accuracy cost (see metrics.fidelity)",
        }
        metrics: dict[str, JsonValue] = {
            "binarized_layers": len(weights),
            "binarized_weight_bytes_before": bytes_before,
            "binarized_weight_bytes_after": bytes_after,
            "binarized_compression": round(bytes_before / bytes_after, 2) if bytes_after else None,
        }
        return PassOutput(model=model, resolved=resolved, metrics=metrics, warnings=warnings)
