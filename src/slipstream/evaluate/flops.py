"""Arithmetic work per inference, counted from the graph, and this CPU's estimated peak.

Only the ops that dominate compute are counted (Conv, ConvTranspose, MatMul, Gemm, their integer and
quantized forms, and MatMulNBits); element-wise ops add a few percent at most and are left out, so
achieved GFLOP/s is a slight underestimate. The report says which op types were counted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from math import prod
from pathlib import Path

import onnx
from onnx import shape_inference
from pydantic import BaseModel, ConfigDict, Field

_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulNBits"}
_CONV_OPS = {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "ConvTranspose"}


class WorkCount(BaseModel):
    """Multiply-accumulate work of one inference at a given batch size."""

    model_config = ConfigDict(frozen=True)

    flops: int = Field(description="2 × multiply-accumulates in the counted ops.")
    counted_ops: dict[str, int] = Field(description="How many nodes of each counted op type.")
    uncounted_nodes: int = Field(description="Counted-type nodes whose shapes could not be inferred.")


class PeakEstimate(BaseModel):
    model_config = ConfigDict(frozen=True)

    gflops: float
    method: str = Field(description="How the number was estimated, in words.")


def _shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, input_shapes[inp.name], strict=False):
                d.Clear()
                d.dim_value = size
    inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _node_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    out = shapes.get(node.output[0])
    if node.op_type == "Gemm":
        a = shapes.get(node.input[0])
        if a is None or out is None:
            return None
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return 2 * prod(out) * k
    if node.op_type in _MATMUL_OPS:
        a = shapes.get(node.input[0])
        if a is None or out is None:
            return None
        return 2 * prod(out) * a[-1]
    if node.op_type in _CONV_OPS:
        w_index = 3 if node.op_type == "QLinearConv" else 1
        w = shapes.get(node.input[w_index])
        if w is None or out is None:
            return None
        if node.op_type == "ConvTranspose":
            x = shapes.get(node.input[0])
            return None if x is None else 2 * prod(x) * prod(w[1:])
        # Each output element needs (Cin / groups) × kernel MACs, which is w[1] × kernel.
        return 2 * prod(out) * prod(w[1:])
    return None


def count_work(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> WorkCount:
    """FLOPs of one run at concrete input shapes (symbolic dims fixed by ``input_shapes``)."""
    shapes = _shapes(model, input_shapes)
    total = 0
    counted: dict[str, int] = {}
    missing = 0
    for node in model.graph.node:
        if node.op_type not in _MATMUL_OPS | _CONV_OPS | {"Gemm"}:
            continue
        flops = _node_flops(node, shapes)
        if flops is None:
            missing += 1
            continue
        total += flops
        counted[node.op_type] = counted.get(node.op_type, 0) + 1
    return WorkCount(flops=total, counted_ops=counted, uncounted_nodes=missing)


def estimate_peak_gflops(cpuinfo: str | None = None, cores: int | None = None) -> PeakEstimate:
    """fp32 peak = cores × clock × FLOPs per cycle, from /proc/cpuinfo's flags and vendor.

    FLOPs per cycle per core: 64 with AVX-512 on Intel (two 512-bit FMA units), 32 with AVX-512 on
    AMD Zen 4 (512-bit ops run on two 256-bit FMA units) and with AVX2/FMA, 8 otherwise.
    """
    text = cpuinfo if cpuinfo is not None else _read_cpuinfo()
    from slipstream.runtime.targets import physical_cores

    n = cores or physical_cores()
    flag_line = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    vendor = m.group(1) if (m := re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)) else "unknown"
    mhz_values = [float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    mhz = max(mhz_values) if mhz_values else 2000.0
    if "avx512f" in flags:
        per_cycle, why = (32, "AVX-512 on AMD (two 256-bit FMA pipes)") if vendor == "AuthenticAMD" else (
            64, "AVX-512 (two 512-bit FMA units)")  # fmt: skip
    elif "avx2" in flags and "fma" in flags:
        per_cycle, why = 32, "AVX2 + FMA (two 256-bit FMA units)"
    else:
        per_cycle, why = 8, "no AVX2/FMA"
    gflops = n * mhz / 1000.0 * per_cycle
    method = (
        f"{n} physical cores × {mhz:.0f} MHz (/proc/cpuinfo, base clock; turbo may be higher) × "
        f"{per_cycle} fp32 FLOPs/cycle ({why}, vendor {vendor})"
    )
    return PeakEstimate(gflops=gflops, method=method)


def _read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else f"cpu cores: {os.cpu_count()}"
