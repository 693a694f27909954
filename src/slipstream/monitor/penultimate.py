"""A classifier's penultimate activations as a monitoring-only bundle output.

The MMD test on an embedding (:mod:`slipstream.monitor.content`) needs one for a classifier too: the input of
its final Gemm/MatMul (the classifier head) is the representation the head separates classes with, and a
shift there shows before the class mix moves. :func:`with_embedding_output` writes a NEW bundle whose graph
has one more output, an ``Identity`` of that tensor named :data:`EMBEDDING_OUTPUT` (a name no exporter makes,
so it cannot clash). The manifest's ``outputs`` stay as they were, so the served metadata, the reply and the
output-name checks never show it; the manifest records it under ``resolved["monitoring_outputs"]``, and the
engine fetches it only when asked (the server asks only with monitoring on).

Only an unambiguous head is taken: walking back from a 2-D float output through the ops a head ends with
(Softmax, Sigmoid, a bias Add, Identity, Cast, Flatten/Reshape), the first op must be a Gemm (no transA) or
MatMul whose data input is a known rank-2 float tensor. Anything else (an embedding model, a transformer's
3-D head, a fused or quantized head) gets no extra output, and the profile notes the test is off.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from slipstream.artifact.manifest import MONITORING_OUTPUTS
from slipstream.monitor.content import EMBEDDING_OUTPUT

if TYPE_CHECKING:
    import onnx

EMBEDDING_STEP = "monitor.embedding@1"
_PASS_THROUGH = {"Softmax", "LogSoftmax", "Sigmoid", "Identity", "Cast", "Flatten", "Reshape", "Add"}
_FLOAT = 1  # onnx.TensorProto.FLOAT


def find_head_input(model: onnx.ModelProto) -> tuple[str, str, int] | None:
    """``(tensor, head node, width)``: the data input of the classifier head, or None when there is none."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {i.name for i in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    }
    shapes = {v.name: v.type.tensor_type for v in (*graph.value_info, *graph.input, *graph.output)}

    def rank2_float(name: str) -> int | None:
        t = shapes.get(name)
        if t is None or t.elem_type != _FLOAT or len(t.shape.dim) != 2:
            return None
        width = t.shape.dim[1]
        return int(width.dim_value) if width.HasField("dim_value") and width.dim_value > 0 else None

    for out in graph.output:
        if rank2_float(out.name) is None:
            continue
        name, seen = out.name, 0
        while name in producer and seen < 8:
            node, seen = producer[name], seen + 1
            if node.op_type in ("Gemm", "MatMul"):
                trans_a = any(a.name == "transA" and a.i for a in node.attribute)
                width = rank2_float(node.input[0])
                if trans_a or width is None or node.input[0] in constants:
                    break
                return node.input[0], node.name or node.op_type, width
            if node.op_type not in _PASS_THROUGH:
                break
            data = [i for i in node.input if i and i not in constants]
            if len(data) != 1:  # an Add of two activations is a residual, not a bias
                break
            name = data[0]
    return None


def add_embedding_output(model: onnx.ModelProto, tensor: str, width: int) -> onnx.ModelProto:
    """A copy of ``model`` with ``Identity(tensor) -> EMBEDDING_OUTPUT`` as an extra graph output."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    batch = out.graph.input[0].type.tensor_type.shape.dim[0]
    first = batch.dim_param or (batch.dim_value if batch.HasField("dim_value") else "batch")
    out.graph.node.append(helper.make_node("Identity", [tensor], [EMBEDDING_OUTPUT], name="slipstream_embedding"))
    out.graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, _FLOAT, [first, width]))
    return out


def with_embedding_output(bundle_dir: str | Path, dest: str | Path, *, overwrite: bool = False) -> Path | None:
    """A NEW bundle at ``dest`` with the monitoring-only embedding output (lineage step ``monitor.embedding@1``),
    or None (nothing written) when the model has no classifier head to take it from, or already has one."""
    from slipstream.artifact.bundle import MANIFEST_FILE, MODEL_FILE, Bundle, Step, write_bundle

    started = time.perf_counter()
    source = Bundle.load(bundle_dir)
    if MONITORING_OUTPUTS in source.manifest.resolved:
        return None
    model = source.load_model()
    head = find_head_input(model)
    if head is None:
        return None
    tensor, node, width = head
    exposed = add_embedding_output(model, tensor, width)
    taken = f"input '{tensor}' of {node} ({width} values per row)"
    manifest = source.manifest.model_copy(
        update={"resolved": {**source.manifest.resolved, MONITORING_OUTPUTS: {EMBEDDING_OUTPUT: taken}}}
    )
    extra = {
        name: (source.path / name).read_bytes()
        for name in source.manifest.files
        if name not in (MODEL_FILE, MANIFEST_FILE, "model.onnx.data")
    }
    step = Step(
        name=EMBEDDING_STEP,
        config={"output": EMBEDDING_OUTPUT, "tensor": tensor, "head": node},
        duration_s=time.perf_counter() - started,
        input_sha256=source.model_sha256,
    )
    return write_bundle(dest, exposed, manifest, step=step, extra_files=extra, overwrite=overwrite).path
