"""Target profiles: which execution providers and session settings a deployment uses."""

from __future__ import annotations

import os
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slipstream.errors import ConfigError, invalid_setting

TargetName = Literal["cpu", "edge-cpu", "cuda", "tensorrt", "openvino"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]

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


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class Target(BaseModel):
    """Where and how a bundle runs. Unset thread counts resolve at session build time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: TargetName = Field(default="cpu", description="Deployment target profile.")
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="Threads inside one operator; default: physical cores (1 on edge-cpu)."
    )
    inter_op_threads: int | None = Field(default=None, ge=1, description="Threads across operators.")
    execution_mode: ExecutionMode = Field(default="sequential", description="Operator scheduling.")
    graph_optimization: GraphOptimization = Field(default="all", description="onnxruntime graph optimizations.")
    allow_fallback: bool = Field(
        default=False,
        description="Run on the next available provider when the target's first one is missing, and record it.",
    )

    @property
    def providers(self) -> tuple[str, ...]:
        return PROVIDERS[self.name]

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
