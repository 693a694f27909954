"""The engine and precision a bundle runs with, and the CPU features that choice depends on.

A bundle records its engine as a resolved choice: ``resolved["engine"]`` (written by the build for its
winner) or the ``engine.openvino`` pass's entry (a candidate). Everything that runs a bundle (``serve``,
``bench``, the build's measurements, ``export``) reads it through :func:`engine_choice`, so what the build
measured is what runs. A bundle without one runs on onnxruntime, as bundles always did.

Speed and, for bf16 and int8, the numbers themselves depend on the CPU: OpenVINO computes bf16 natively only
with AMX-BF16 or AVX512-BF16 (elsewhere it silently runs f32: measured on an AVX2-only AMD EPYC, where a bf16
hint compiled to f32), and int8 kernels are fast and exact only with an int8 dot product (VNNI, AMX). So the
choice carries the features it needs and those of the CPU it was measured on, and loading it on a CPU that
lacks them warns (or refuses, by setting) with what was measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slipstream.artifact.hashing import sha256_json
from slipstream.artifact.manifest import Manifest
from slipstream.errors import invalid_setting
from slipstream.runtime.targets import cpu_flags, cpu_model

EngineName = Literal["onnxruntime", "openvino"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
# OpenVINO's INFERENCE_PRECISION_HINT values we set. Always set: OpenVINO's own default is bf16 on AMX CPUs.
InferencePrecision = Literal["f32", "bf16"]

ENGINE_KEY = "engine"
ENGINE_PASS = "engine.openvino"
# The CPU flags (as /proc/cpuinfo spells them) recorded beside every choice.
CPU_FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
# What each precision needs to run as measured: any one of these.
NEEDS: dict[str, tuple[str, ...]] = {
    "bf16": ("amx_bf16", "avx512_bf16"),
    "int8": ("amx_int8", "avx512_vnni", "avx_vnni"),
}
# What happens without them, as measured on this project's machines (shared/FACTS.md).
CONSEQUENCES: dict[tuple[str, str], str] = {
    ("openvino", "bf16"): (
        "OpenVINO has no bf16 kernels on this CPU and runs the model at f32 instead: outputs differ from the bf16 "
        "ones the build's budget accepted, and the bf16 speed is lost (MiniLM, batch 32, measured on a Xeon with "
        "AMX: 22 ms at bf16, 80 ms at f32, 3.6x slower)"
    ),
    ("openvino", "int8"): (
        "int8 runs without an int8 dot product here: slower kernels, which can saturate on 8-bit weights "
        "(measured on an AVX2-only AMD EPYC: static int8 of the digits CNN lost 1.8 accuracy points on onnxruntime)"
    ),
}


class EngineChoice(BaseModel):
    """Which runtime runs a bundle, at which precision, and which CPU features that depends on."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    engine: EngineName = Field(default="onnxruntime", description="The runtime that runs the bundle.")
    precision: Precision = Field(default="fp32", description="What the model computes in: fp32, fp16, bf16, int8.")
    inference_precision: InferencePrecision = Field(
        default="f32", description="OpenVINO's INFERENCE_PRECISION_HINT for layers not quantized (f32 or bf16)."
    )
    needs_any: tuple[str, ...] = Field(
        default=(), description="CPU flags of which at least one must be present to run as measured."
    )
    cpu_features: dict[str, bool] = Field(
        default_factory=dict, description="The CPU features of the machine the choice was made on."
    )
    cpu_model: str = Field(default="", description="The CPU model the choice was made on.")
    measured: dict[str, float] = Field(
        default_factory=dict,
        description="What the build measured for this choice: latency_p50_ms, batch_size, gain over the baseline.",
    )


def cpu_features(flags: frozenset[str] | None = None) -> dict[str, bool]:
    """The engine-relevant CPU features, each present or not."""
    have = cpu_flags() if flags is None else flags
    return {f: f in have for f in CPU_FEATURES}


def model_precision(manifest: Manifest) -> Precision:
    """What the model's weights compute in, from its lineage: int8 after quantization, fp16 after precision.fp16."""
    steps = {e.step.split("@")[0] for e in manifest.lineage}
    if steps & {"quantize.dynamic", "quantize.static", "quantize.nncf"} or manifest.resolved.get("quantized") is True:
        return "int8"
    if "precision.fp16" in steps:
        return "fp16"
    return "fp32"


def needs_for(engine: EngineName, precision: Precision, inference_precision: InferencePrecision) -> tuple[str, ...]:
    """The CPU features a choice depends on (any one of them), () when it runs as measured on any x86-64.

    onnxruntime's int8 needs none here: its Engine already checks VNNI/AMX at load and runs saturating QDQ
    models unfused (runtime/targets.py ``int8_fusion``), and records that."""
    if engine != "openvino":
        return ()
    if inference_precision == "bf16":
        return NEEDS["bf16"]
    if precision == "int8":
        return NEEDS["int8"]
    return ()


def make_choice(
    manifest: Manifest, engine: EngineName, inference_precision: InferencePrecision = "f32"
) -> EngineChoice:
    """The choice for ``manifest`` on ``engine``, with this machine's CPU features."""
    weights = model_precision(manifest)
    precision: Precision = weights if weights != "fp32" or engine == "onnxruntime" else "fp32"
    if engine == "openvino" and weights == "fp32" and inference_precision == "bf16":
        precision = "bf16"
    return EngineChoice(
        engine=engine,
        precision=precision,
        inference_precision=inference_precision,
        needs_any=needs_for(engine, precision, inference_precision),
        cpu_features=cpu_features(),
        cpu_model=cpu_model(),
    )


def engine_choice(manifest: Manifest) -> EngineChoice:
    """The bundle's recorded engine choice: ``resolved["engine"]``, else the last ``engine.openvino`` step's,
    else onnxruntime at the model's own precision."""
    resolved = manifest.resolved
    entry: object = resolved.get(ENGINE_KEY)
    if not isinstance(entry, Mapping):
        entry = None
        for key, value in resolved.items():
            if key.split("#")[0] == ENGINE_PASS and isinstance(value, Mapping):
                entry = value
    if entry is None:
        return EngineChoice(precision=model_precision(manifest))
    try:
        return EngineChoice.model_validate(entry)
    except ValidationError as exc:
        raise invalid_setting(exc, "resolved.engine") from exc


def engine_key(model_sha256: str, manifest: Manifest) -> str:
    """What identifies a runnable bundle for measurement caches: the model's bytes, plus the engine and its
    precision hint when it is not onnxruntime (an OpenVINO candidate has the same bytes as its input)."""
    choice = engine_choice(manifest)
    if choice.engine == "onnxruntime":
        return model_sha256
    return sha256_json([model_sha256, choice.engine, choice.inference_precision])


def missing_features(choice: EngineChoice, flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The features the choice depended on where it was measured, of which this CPU has none (empty when it
    runs here as it was measured). A choice measured on a CPU that lacked them too depended on none of them:
    its numbers already are those of a CPU without them."""
    used = tuple(f for f in choice.needs_any if choice.cpu_features.get(f, True))
    if not used:
        return ()
    have = cpu_flags() if flags is None else flags
    return () if any(f in have for f in used) else used


def feature_warning(
    choice: EngineChoice, bundle_name: str, missing: tuple[str, ...], flags: frozenset[str] | None = None
) -> str:
    """The warning for a bundle whose choice needs CPU features this machine lacks: what, and what it costs."""
    where = choice.cpu_model or "the build machine"
    measured = ""
    m = choice.measured
    if "latency_p50_ms" in m:
        gain = f", {m['gain']:.2f}x the onnxruntime fp32 baseline" if "gain" in m else ""
        measured = f" (measured there: p50 {m['latency_p50_ms']:.3g} ms at batch {int(m.get('batch_size', 1))}{gain})"
    consequence = CONSEQUENCES.get((choice.engine, choice.precision)) or CONSEQUENCES.get(
        (choice.engine, "bf16" if choice.inference_precision == "bf16" else choice.precision), ""
    )
    return (
        f"Bundle '{bundle_name}' was built to run on {choice.engine} at {choice.precision} on {where}{measured}, "
        f"which needs one of {', '.join(missing)}; this CPU ({cpu_model()}) has none of them"
        f"{_present(flags)}. {consequence}."
    )


def recorded_choice(manifest: Manifest, measured: Mapping[str, float]) -> EngineChoice:
    """The choice a build writes into its winner as ``resolved["engine"]``: the candidate's engine (onnxruntime
    unless an engine step chose another), this machine's CPU features, and what the build measured."""
    choice = engine_choice(manifest)
    if choice.engine == "onnxruntime":
        choice = make_choice(manifest, "onnxruntime")
    return choice.model_copy(update={"measured": dict(measured)})


def _present(flags: frozenset[str] | None) -> str:
    have = [f for f, on in cpu_features(flags).items() if on]
    return f" (it has {', '.join(have)})" if have else ""
