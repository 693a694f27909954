"""Target profiles: which execution providers and session settings a deployment uses."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slipstream.errors import ConfigError, invalid_setting

TargetName = Literal["cpu", "edge-cpu", "cuda", "tensorrt", "openvino"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]
MissingFeaturePolicy = Literal["warn", "refuse"]

# What each target asks onnxruntime for, most preferred first; CPU is always last as the host fallback.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "edge-cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "openvino": ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
}

# The package that brings each accelerated provider, for the error when it is missing.
PROVIDER_PACKAGES: dict[str, str] = {
    "CUDAExecutionProvider": "onnxruntime-gpu (and a matching CUDA + cuDNN)",
    "TensorrtExecutionProvider": "onnxruntime-gpu built with TensorRT, plus TensorRT itself",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
}


# The session settings a bundle may carry as tuned choices (resolved["session"]), which an Engine applies.
BUNDLE_SESSION_KEYS = (
    "intra_op_threads",
    "inter_op_threads",
    "execution_mode",
    "graph_optimization",
    "intra_op_spinning",
)


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), printed beside every measurement: speed depends on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def has_int8_dot_product(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has an int8 dot-product instruction (VNNI or AMX). Without one, onnxruntime's u8·s8
    kernels add pairs of products in 16 bits, which saturate on 8-bit weights: measured here on an AVX2-only
    AMD EPYC, static int8 of the digits CNN lost 1.8 points of accuracy, and none with 7-bit weights."""
    return any(f in (cpu_flags() if flags is None else flags) for f in INT8_DOT_FLAGS)


def int8_fusion(full_range_weights: bool, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether onnxruntime may fuse a QDQ int8 model into its integer kernels on this CPU, and why.

    Without VNNI/AMX those kernels saturate on weights that use the full 8-bit range (a TFLite int8 model, or
    a static int8 model made on a CPU with VNNI): measured here, outputs moved by up to 7 quantization steps.
    Unfused, onnxruntime runs DequantizeLinear → float → QuantizeLinear, which is exact, at float speed."""
    if not full_range_weights:
        return True, "fused: no int8 weights, or 7-bit ones (reduce_range), which no CPU saturates"
    if has_int8_dot_product(flags):
        return True, "fused: this CPU has an int8 dot product (VNNI/AMX)"
    return False, (
        "unfused: this CPU has no VNNI/AMX, whose absence makes the fused kernels saturate on the model's "
        "8-bit weights; run exactly as DequantizeLinear → float → QuantizeLinear"
    )


class Target(BaseModel):
    """Where and how a bundle runs. Unset thread counts resolve at session build time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TargetName = Field(default="cpu", description="Deployment target profile.")
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="Threads inside one operator; default: physical cores (1 on edge-cpu)."
    )
    inter_op_threads: int | None = Field(default=None, ge=1, description="Threads across operators.")
    execution_mode: ExecutionMode = Field(default="sequential", description="Operator scheduling.")
    intra_op_spinning: bool | None = Field(
        default=None,
        description="Whether onnxruntime's intra-op threads spin while waiting for work (unset: onnxruntime's "
        "default, on). Off gives the cores back to neighbours (the HTTP layer, other processes); the build "
        "tries both at more than one thread.",
    )
    graph_optimization: GraphOptimization = Field(default="all", description="onnxruntime graph optimizations.")
    allow_fallback: bool = Field(
        default=False,
        description="Run on the next available provider when the target's first one is missing, and record it.",
    )
    missing_cpu_features: MissingFeaturePolicy = Field(
        default="warn",
        description="A bundle whose engine choice needs CPU features this machine lacks (bf16, int8 dot "
        "product): warn with the measured consequence and run, or refuse to load it.",
    )

    @property
    def providers(self) -> tuple[str, ...]:
        return PROVIDERS[self.name]

    def with_bundle_session(self, session: object) -> Target:
        """This target, with a bundle's tuned session settings (``resolved["session"]``, written by the build)
        for every setting the caller left unset. A value set here (``--threads 4``) wins over the bundle's."""
        if not isinstance(session, Mapping):
            return self
        mine = {k for k in self.model_fields_set if getattr(self, k) is not None}
        taken = {k: session[k] for k in BUNDLE_SESSION_KEYS if k in session and k not in mine}
        if not taken:
            return self
        try:
            return Target.model_validate({**self.model_dump(), **taken})
        except ValidationError as exc:
            raise invalid_setting(exc, "resolved.session") from exc

    def resolved_intra_op_threads(self) -> int:
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        return 1 if self.name == "edge-cpu" else physical_cores()


def target(name: str = "cpu", **settings: object) -> Target:
    """Build a target by name, with a clear error for an unknown one."""
    if name not in PROVIDERS:
        raise ConfigError(
            f"Unknown target {name!r}; expected one of {', '.join(PROVIDERS)}.",
            field="target",
            hint="Use 'cpu' for a server CPU.",
        )
    try:
        return Target.model_validate({"name": name, **settings})
    except ValidationError as exc:
        raise invalid_setting(exc, "target") from exc
