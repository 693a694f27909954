"""The pass catalogue: stable names (``quantize.dynamic@1``) → lazily imported modules.

Nothing is imported until a pass is used, so torch or tensorflow load only for the passes that need
them. Each entry also declares the model kind a pass takes and returns, which is enough to check a
recipe's order before any work starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from slipstream.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from slipstream.passes.base import AnyPass, ModelKind


@dataclass(frozen=True)
class PassSpec:
    """One catalogue entry: what a pass is called, where it lives, what it takes and what it needs."""

    name: str
    version: int
    module: str
    attr: str
    input_kind: ModelKind
    output_kind: ModelKind
    summary: str
    extra: str | None = None
    requires: tuple[str, ...] = ()

    @property
    def step_name(self) -> str:
        return f"{self.name}@{self.version}"


def _onnx(name: str, module: str, attr: str, summary: str) -> PassSpec:
    return PassSpec(name, 1, f"slipstream.passes.{module}", attr, "onnx", "onnx", summary)


_ENTRIES = (
    _onnx("graph.optimize", "graph", "GraphOptimize", "onnxruntime offline graph optimization + transformer fusions"),
    _onnx("quantize.dynamic", "quantize_dynamic", "QuantizeDynamic", "int8 weights, activations quantized at run time"),
    _onnx("quantize.static", "quantize_static", "QuantizeStatic", "int8 QDQ/QOperator calibrated on data"),
    _onnx("precision.fp16", "precision", "Float16", "fp16 weights and compute, fp32 inputs and outputs"),
    _onnx("weights.int4", "weight_only", "Int4Weights", "4-bit MatMulNBits weights (Gemm rewritten to MatMul)"),
    _onnx("weights.binarize", "binarize", "BinarizeWeights", "1-bit sign weights + per-channel scale, bit-packed"),
    _onnx("prune.magnitude", "prune", "PruneMagnitude", "zero the smallest weights (unstructured)"),
    _onnx("prune.random", "prune", "PruneRandom", "zero random weights (unstructured, seeded)"),
    PassSpec(
        "engine.openvino", 1, "slipstream.passes.engine_openvino", "EngineOpenVino", "onnx", "onnx",
        "run on OpenVINO (f32, or bf16 on AMX/AVX512-BF16 CPUs); the model is unchanged", extra="openvino",
        requires=("openvino",),
    ),
    PassSpec(
        "quantize.nncf", 1, "slipstream.passes.quantize_nncf", "QuantizeNncf", "onnx", "onnx",
        "int8 QDQ by NNCF post-training quantization on real data (OpenVINO's int8 layout)", extra="nncf",
        requires=("nncf",),
    ),
    PassSpec(
        "prune.structured", 1, "slipstream.passes.prune_structured", "PruneStructured", "torch", "torch",
        "remove channels/neurons/attention heads (L1, L2, random, Taylor); really smaller and faster",
        extra="torch", requires=("torch", "torch_pruning"),
    ),
    PassSpec(
        "prune.unstructured", 1, "slipstream.passes.prune_unstructured", "PruneUnstructured", "torch", "torch",
        "zero single weights (magnitude, random, Taylor), made permanent", extra="torch", requires=("torch",),
    ),
    PassSpec(
        "train.finetune", 1, "slipstream.passes.finetune", "Finetune", "torch", "torch",
        "recovery training: SGD/Adam, LR decay, clipping, early stopping, distillation",
        extra="torch", requires=("torch",),
    ),
    PassSpec(
        "train.distill", 1, "slipstream.passes.distill", "Distill", "torch", "torch",
        "label-free recovery: match the original's outputs (MSE/cosine) on data or text at hand",
        extra="torch", requires=("torch",),
    ),
    PassSpec(
        "export", 1, "slipstream.passes.export", "ExportOnnx", "torch", "onnx",
        "torch model → ONNX bundle with a parity proof (dynamo exporter)", extra="torch",
        requires=("torch", "onnxscript"),
    ),
)  # fmt: skip

CATALOGUE: MappingProxyType[str, PassSpec] = MappingProxyType({e.name: e for e in _ENTRIES})


def known_names(catalogue: MappingProxyType[str, PassSpec] = CATALOGUE) -> list[str]:
    return sorted(spec.step_name for spec in catalogue.values())


def lookup(ref: str, catalogue: MappingProxyType[str, PassSpec] = CATALOGUE) -> PassSpec:
    """The entry for ``name`` or ``name@version``; an unknown name lists the known ones."""
    name, _, version = ref.strip().partition("@")
    spec = catalogue.get(name)
    if spec is None:
        raise ConfigError(
            f"Unknown pass {ref!r}. Known passes: {', '.join(known_names(catalogue))}.",
            field="pass",
            hint="Check the spelling; `slipstream optimize --list` prints the catalogue.",
        )
    if version and version != str(spec.version):
        raise ConfigError(
            f"Pass {name!r} has version {spec.version} in this slipstream; the recipe asks for @{version}.",
            field="pass",
            hint=f"Use {spec.step_name} (or no version), or install the slipstream that had {ref}.",
        )
    return spec


def load_pass(spec: PassSpec) -> AnyPass:
    """Import the pass's module and instantiate it; a missing extra raises MissingDependencyError."""
    for package in spec.requires:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(package, extra=spec.extra or "all", feature=f"Pass {spec.step_name}") from exc
    module = importlib.import_module(spec.module)
    cls = getattr(module, spec.attr)
    instance: AnyPass = cls()
    return instance


def check_order(specs: Sequence[PassSpec], start: ModelKind) -> None:
    """Refuse a recipe whose passes do not chain by model kind; one error lists every break."""
    problems: list[str] = []
    kind = start
    for spec in specs:
        if spec.input_kind != kind:
            if spec.input_kind == "torch":
                problems.append(f"{spec.name} works on a torch model; put it before export")
            else:
                problems.append(f"{spec.name} works on an ONNX model; put it after export")
        kind = spec.output_kind
    if problems:
        order = " → ".join(s.name for s in specs)
        raise ConfigError(
            f"The recipe {order} (starting from a {start} model) is out of order: {'; '.join(problems)}.",
            field="passes",
            hint="A recipe reads: [torch passes] → export → [ONNX passes].",
        )
