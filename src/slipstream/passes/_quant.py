"""What the two int8 passes share: pre-processing and the notes they write."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import onnx

from slipstream.passes._onnx import load, save


def preprocess(model: onnx.ModelProto, workdir: Path) -> tuple[onnx.ModelProto, str]:
    """onnxruntime's quantization pre-processing (shape inference + basic optimization).

    Symbolic shape inference fails on some exports (BERT from dynamo: "Incomplete symbolic shape
    inference"); then it is skipped, and the returned note says so.
    """
    from onnxruntime.quantization.preprocess import quant_pre_process

    logging.getLogger("onnxruntime.quantization.shape_inference").setLevel(logging.WARNING)

    src = save(model, workdir / "pre-in.onnx")
    out = workdir / "pre-out.onnx"
    # On failure, symbolic shape inference dumps "sym_shape_infer_temp.onnx" (+ data) into the current
    # directory; run it from the scratch directory so that nothing lands in the user's.
    with contextlib.chdir(workdir):
        return _run(quant_pre_process, model, src, out)


def _run(quant_pre_process: Any, model: onnx.ModelProto, src: Path, out: Path) -> tuple[onnx.ModelProto, str]:
    try:
        quant_pre_process(str(src), str(out))
        return load(out), "full"
    except Exception as first:  # symbolic shape inference raises plain Exceptions
        try:
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            return load(out), f"skip_symbolic_shape (symbolic shape inference failed: {str(first)[:120]})"
        except Exception as second:  # keep the unprocessed graph rather than fail: quantization still works
            return model, f"skipped (pre-processing failed: {str(second)[:120]})"


def has_contrib_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == "com.microsoft" for n in model.graph.node)


# onnxruntime fusions that hide a weight inside a contrib op the quantizers do not handle.
OPAQUE_FUSIONS = ("FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv")


def fused_warning(model: onnx.ModelProto) -> str | None:
    """A warning when graph.optimize ran first and fused ops the quantizer cannot see into."""
    weights = {t.name for t in model.graph.initializer}
    hidden = [
        n.op_type
        for n in model.graph.node
        if n.domain == "com.microsoft" and n.op_type in OPAQUE_FUSIONS and any(i in weights for i in n.input[1:2])
    ]
    if not hidden:
        return None
    return (
        f"{len(hidden)} node(s) were already fused by graph.optimize ({', '.join(sorted(set(hidden)))}) and stay "
        "in fp32: the quantizer cannot see into fused ops. Put graph.optimize after quantization in the recipe."
    )
