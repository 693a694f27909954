"""NVIDIA Triton: a model repository of ``<model>/config.pbtxt`` and ``<model>/<version>/model.onnx``.

Triton's onnxruntime backend runs the bundle's own model.onnx. The config says what slipstream knows and
Triton would otherwise guess: the tensors (``-1`` for a symbolic dim; a batchable model's shared first axis
folded into ``max_batch_size``), dynamic batching sized from the build's measurements, the instance group,
and the execution accelerator of the target the build optimized for. Each version directory is a full copy
of the bundle (manifest included), so it can still be verified where Triton reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from slipstream.artifact.tensor import TensorSpec
from slipstream.deploy import pbtxt
from slipstream.deploy.base import DeployOptions, DeploySource, SourceBundle
from slipstream.deploy.files import copy_bundle
from slipstream.deploy.resources import batchable, build_measurements, build_target

CONFIG_FILE = "config.pbtxt"
# Triton's type for each bundle dtype (model_config.proto's DataType).
TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "string": "TYPE_STRING",
}
# slipstream serve's own defaults (cli/app.py): used when the build measured nothing.
DEFAULT_MAX_BATCH = 32
DEFAULT_QUEUE_DELAY_US = 2000


class TritonDeployer:
    name: ClassVar[str] = "triton"

    def refusals(self, source: DeploySource, options: DeployOptions) -> list[str]:
        reasons = []
        for item in source.bundles:
            if not item.version.isdigit():
                reasons.append(
                    f"model '{item.name}' has version '{item.version}'; Triton's version directories are numbers "
                    "(rename it, e.g. to 1)"
                )
            if options.batching and not batchable(item.bundle.manifest):
                io = ", ".join(f"{s.name} {list(s.shape)}" for s in (*item.bundle.manifest.inputs,))
                reasons.append(
                    f"model '{item.name}' cannot batch (batching needs one shared symbolic first axis on every "
                    f"input and output; inputs: {io}): export without --batching, or re-export it with a dynamic "
                    "batch axis"
                )
        for name, items in _by_model(source).items():
            shapes = {_signature(i) for i in items}
            if len(shapes) > 1:
                reasons.append(
                    f"model '{name}' has versions with different inputs or outputs; one Triton config.pbtxt "
                    "describes every version: export them under different model names"
                )
        return reasons

    def write(self, source: DeploySource, options: DeployOptions, into: Path) -> list[Path]:
        written: list[Path] = []
        for name, items in _by_model(source).items():
            model_dir = into / name
            for item in items:
                written += copy_bundle(item.bundle, model_dir / item.version)
            newest = max(items, key=lambda i: int(i.version) if i.version.isdigit() else -1)
            config = model_dir / CONFIG_FILE
            config.write_text(model_config(newest, options), encoding="utf-8")
            written.append(config)
        return written


def _by_model(source: DeploySource) -> dict[str, list[SourceBundle]]:
    models: dict[str, list[SourceBundle]] = {}
    for item in source.bundles:
        models.setdefault(item.name, []).append(item)
    return models


def _signature(item: SourceBundle) -> tuple[tuple[str, str, tuple[object, ...]], ...]:
    manifest = item.bundle.manifest
    return tuple((s.name, s.dtype, s.shape) for s in (*manifest.inputs, *manifest.outputs))


def model_config(item: SourceBundle, options: DeployOptions) -> str:
    """The config.pbtxt text of one model, from its newest version."""
    manifest = item.bundle.manifest
    batch = options.batching is not False and batchable(manifest)
    measured = build_measurements(item.bundle)
    config: dict[str, pbtxt.Value] = {
        "name": item.name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": 0,
    }
    notes = [f"Written by `slipstream export --to triton` from bundle {item.name} version {item.version}."]
    if batch:
        config["max_batch_size"], dynamic, why = _batching(measured, options)
        config["dynamic_batching"] = dynamic
        notes.append(why)
    else:
        notes.append("No batch axis folded: the model cannot batch, or batching was turned off.")
    config["input"] = [_tensor(s, batch) for s in manifest.inputs]
    config["output"] = [_tensor(s, batch) for s in manifest.outputs]
    accelerator = _accelerator(item, options)
    kind = "KIND_GPU" if accelerator == "tensorrt" else "KIND_CPU"
    config["instance_group"] = [{"count": options.instances_per_replica, "kind": pbtxt.Enum(kind)}]
    if accelerator == "tensorrt":
        fp16 = any(s.dtype == "float16" for s in manifest.inputs)
        params = {"precision_mode": "FP16" if fp16 else "FP32", "max_workspace_size_bytes": str(1 << 30)}
        tensorrt: pbtxt.Value = {"name": "tensorrt", "parameters": pbtxt.parameters(params)}
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [tensorrt]}}
    elif accelerator == "openvino":
        config["optimization"] = {"execution_accelerators": {"cpu_execution_accelerator": [{"name": "openvino"}]}}
    notes.append(f"Execution accelerator: {accelerator} (bundle build target: {build_target(item.bundle) or 'none'}).")
    notes.extend(_engine_notes(item))
    return pbtxt.dumps(config, comment="\n".join(notes))


def _batching(measured: Mapping[str, object], options: DeployOptions) -> tuple[int, pbtxt.Value, str]:
    """max_batch_size, the dynamic_batching message, and a comment saying where the numbers came from.

    The build measured the winner at its recipe's batch size: that size is the preferred one, and a request
    waits at most one measured batch latency for a batch to fill (longer would cost more than batching saves).
    """
    measured_batch = measured.get("batch_size")
    p50_ms = measured.get("latency_p50_ms")
    size = measured_batch if isinstance(measured_batch, int) and measured_batch >= 1 else None
    max_batch = options.max_batch_size or max(DEFAULT_MAX_BATCH, size or 1)
    if options.max_queue_delay_us is not None:
        delay_us, delay_why = options.max_queue_delay_us, "as given"
    elif isinstance(p50_ms, int | float) and p50_ms > 0:
        delay_us = max(1, min(DEFAULT_QUEUE_DELAY_US, round(p50_ms * 1000)))
        delay_why = f"the build's p50 of {p50_ms:.3f} ms at batch {size}, capped at {DEFAULT_QUEUE_DELAY_US} µs"
    else:
        delay_us, delay_why = DEFAULT_QUEUE_DELAY_US, "slipstream serve's default: the build measured nothing"
    dynamic: dict[str, pbtxt.Value] = {"max_queue_delay_microseconds": delay_us}
    preferred = [size] if size is not None and 1 < size <= max_batch else []
    if preferred:
        dynamic["preferred_batch_size"] = preferred
    why = (
        f"Batching: max_batch_size {max_batch}, preferred {preferred or 'none'}, "
        f"max queue delay {delay_us} µs ({delay_why})."
    )
    return max_batch, dynamic, why


def _tensor(spec: TensorSpec, batch: bool) -> pbtxt.Value:
    dims = spec.shape[1:] if batch else spec.shape
    tensor: dict[str, pbtxt.Value] = {
        "name": spec.name,
        "data_type": pbtxt.Enum(TRITON_TYPES[spec.dtype]),
        "dims": [d if isinstance(d, int) else -1 for d in dims],
    }
    if not dims:  # a scalar per row: Triton wants a shape, and reshapes [1] to the model's []
        tensor["dims"] = [1]
        tensor["reshape"] = {"shape": []}
    return tensor


def _accelerator(item: SourceBundle, options: DeployOptions) -> str:
    if options.accelerator != "auto":
        return options.accelerator
    from slipstream.runtime.choice import engine_choice

    if engine_choice(item.bundle.manifest).engine == "openvino":  # the build chose OpenVINO: its accelerator
        return "openvino"
    target = build_target(item.bundle)
    return target if target in ("tensorrt", "openvino") else "none"


def _engine_notes(item: SourceBundle) -> list[str]:
    """What the build chose to run the model on, so a reader of config.pbtxt sees the precision it measured."""
    from slipstream.runtime.choice import engine_choice

    choice = engine_choice(item.bundle.manifest)
    if choice.engine != "openvino":
        return []
    text = f"The bundle records OpenVINO at {choice.precision} (inference precision {choice.inference_precision})"
    if choice.inference_precision == "bf16":
        text += (
            "; Triton's OpenVINO accelerator picks its own precision (bf16 only on AMX CPUs): serve with "
            "`slipstream serve` to run exactly what the build measured"
        )
    return [text + "."]
