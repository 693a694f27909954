"""Operators: the named minimal operator sets an edge build may promise, and what a model actually uses.

A minimal onnxruntime build (``build.sh --minimal_build --include_ops_by_config FILE``) carries only the
kernels it lists, which is what keeps it small; a model with an operator outside it fails on the device. So
an export for a named set is refused up front, naming every operator that does not fit.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

Op = tuple[str, str]  # (domain, op type); the default ONNX domain is ""

_ELEMENTWISE = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "Exp",
    "Log",
    "Sqrt",
    "Pow",
    "Neg",
    "Abs",
    "Max",
    "Min",
    "Erf",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "Not",
    "And",
    "Or",
    "Cast",
    "Identity",
)
_SHAPE = (
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Slice",
    "Gather",
    "Shape",
    "Expand",
    "Constant",
    "ConstantOfShape",
    "Split",
    "Range",
)
_INT8 = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul")
_MLP = ("Gemm", "MatMul", "Softmax", "LogSoftmax", "ArgMax", "ReduceMean", "ReduceSum", "ReduceMax")
_CNN = (
    "Conv",
    "ConvInteger",
    "QLinearConv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "BatchNormalization",
    "Pad",
    "Resize",
)
# What torch's dynamo exporter writes for BERT-style encoders (MiniLM): Gelu is an ONNX operator since opset 20.
_TRANSFORMER = (
    "LayerNormalization",
    "ReduceL2",
    "Einsum",
    "Trilu",
    "Gelu",
    "GatherElements",
    "GatherND",
    "GreaterOrEqual",
    "LessOrEqual",
    "IsNaN",
    "IsInf",
)


def _onnx(*groups: tuple[str, ...]) -> frozenset[Op]:
    return frozenset(("", op) for group in groups for op in group)


OPERATOR_SETS: dict[str, frozenset[Op]] = {
    # Dense classifiers and regressors (MLPs, logistic regression), float or int8.
    "mlp": _onnx(_ELEMENTWISE, _SHAPE[:6], _MLP[:5], _INT8),
    # Image models: convolutions, pooling and normalization on top of the MLP set.
    "cnn": _onnx(_ELEMENTWISE, _SHAPE, _MLP, _INT8, _CNN),
    # Encoders such as MiniLM: embeddings, attention, layer norm and pooling.
    "transformer": _onnx(_ELEMENTWISE, _SHAPE, _MLP, _INT8, _TRANSFORMER),
}


def graph_operators(model: onnx.ModelProto) -> set[Op]:
    """Every (domain, op type) the model's graph and its subgraphs use."""
    used: set[Op] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            used.add(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    visit(attribute.g)
                for sub in attribute.graphs:
                    visit(sub)

    visit(model.graph)
    return used


@dataclass(frozen=True)
class RequiredOperators:
    """What an ORT-format model needs from a minimal build: domain → opset → operator types."""

    by_domain: dict[str, dict[int, frozenset[str]]]
    node_count: int

    @property
    def operator_count(self) -> int:
        return sum(len(ops) for opsets in self.by_domain.values() for ops in opsets.values())

    def config_text(self, what: str) -> str:
        """The file onnxruntime's `--include_ops_by_config` reads: `domain;opset;Op1,Op2` per line."""
        lines = [f"# Operators of {what}, for a minimal onnxruntime build (--include_ops_by_config)."]
        for domain in sorted(self.by_domain):
            for opset in sorted(self.by_domain[domain]):
                lines.append(f"{domain};{opset};{','.join(sorted(self.by_domain[domain][opset]))}")
        return "\n".join(lines) + "\n"


def required_operators(ort_path: Path) -> RequiredOperators:
    """Read the ORT-format file with onnxruntime's own tool, which is what its minimal build is configured from."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "ops.config"
        with warnings.catch_warnings():
            # onnxruntime's processor reads the file with open(...).read() and never closes it (1.32).
            warnings.simplefilter("ignore", ResourceWarning)
            create_config_from_models([ort_path], config, enable_type_reduction=False)
        by_domain: dict[str, dict[int, frozenset[str]]] = {}
        for line in config.read_text(encoding="utf-8").splitlines():
            if not line or line.startswith("#"):
                continue
            domain, opset, ops = line.split(";", 2)
            by_domain.setdefault(domain, {})[int(opset)] = frozenset(ops.split(","))
    return RequiredOperators(by_domain=by_domain, node_count=_ort_node_count(ort_path))


def _ort_node_count(ort_path: Path) -> int:
    """Nodes in the ORT-format model's main graph (its flatbuffer, read with onnxruntime's generated classes)."""
    from onnxruntime.tools.ort_format_model import ort_flatbuffers_py  # noqa: F401 (puts fbs on the path)
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    session = InferenceSession.GetRootAsInferenceSession(ort_path.read_bytes(), 0)
    graph = session.Model().Graph()
    return int(graph.NodesLength())
