"""The `auto` candidate ladder: the standard things to try, in order of risk, on every engine at hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slipstream.artifact.bundle import MODEL_FILE
from slipstream.build.recipe import Candidate, Recipe
from slipstream.runtime.choice import NEEDS, cpu_features

OPENVINO_PREFIX = "openvino-"


def auto_candidates(recipe: Recipe, calibration: str, source: Path | None = None) -> tuple[Candidate, ...]:
    """fp32 optimized, fp16, dynamic int8 (plus fused-attention int8 on transformers), static int8 with each
    calibration method, then (with the openvino extra) OpenVINO at f32, bf16 and int8.

    Dynamic int8 is tried on every graph: on Conv-heavy models it is measured and rejected as slower
    (ConvInteger is several times slower than fp32 here), which the report then shows with its reason.
    ``calibration`` is an .npz of real inputs that the build wrote from the recipe's calibration data;
    ``source`` the baseline's ONNX file (else the recipe's model is read where it is ONNX).
    Every candidate is measured at the thread count the target serves with and gated by the same budget, so
    the engine and precision are chosen per model and per CPU like anything else.
    """
    ladder = [
        Candidate(name="fp32-optimized", passes=("graph.optimize",)),
        Candidate(name="fp16", passes=("precision.fp16",)),
        Candidate(name="int8-dynamic", passes=({"quantize.dynamic": {"per_channel": True}},)),
    ]
    if _maybe_transformer(source or Path(recipe.model)):
        ladder.append(FUSED_INT8)
    for method in ("minmax", "entropy", "percentile"):
        options = {"calibration": method, "data": calibration, "per_channel": True}
        ladder.append(Candidate(name=f"int8-static-{method}", passes=({"quantize.static": options},)))
    return (*ladder, *openvino_candidates(calibration))


# Self-attention fused into com.microsoft Attention (graph.optimize), then dynamic int8: QAttention does Q, K
# and V in one integer GEMM and keeps the scores in fp32. Why it is in: see _maybe_transformer and
# benchmarks/results/int8_variants.md. Only onnxruntime runs it (contrib ops): the OpenVINO candidates below
# start from the source model, never from this graph.
FUSED_INT8 = Candidate(
    name="int8-dynamic-fused",
    passes=("graph.optimize", {"quantize.dynamic": {"per_channel": True}}),
)


def _maybe_transformer(path: Path) -> bool:
    """Whether the source may be a transformer (Softmax beside LayerNormalization or ReduceMean), which is
    where the fused int8 candidate can differ from int8-dynamic. A source that is not an ONNX file or bundle
    (a torch entry point) is not read here: it may be one."""
    import onnx
    from google.protobuf.message import DecodeError

    from slipstream.passes.graph import looks_like_transformer

    onnx_path = path / MODEL_FILE if path.is_dir() else path
    if onnx_path.suffix != ".onnx" or not onnx_path.is_file():
        return True
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError):  # an unreadable source fails the build's own load, with its error
        return True
    return looks_like_transformer(graph)


def openvino_candidates(calibration: str) -> tuple[Candidate, ...]:
    """OpenVINO f32, bf16 and int8 on the source model; none without the openvino extra. int8 is NNCF's
    post-training quantization on the recipe's calibration data (the nncf extra), else static QDQ."""
    from slipstream.runtime.openvino_engine import openvino_available

    if not openvino_available():
        return ()
    f32 = {"engine.openvino": {"precision": "f32"}}
    bf16 = {"engine.openvino": {"precision": "bf16"}}
    if importlib.util.find_spec("nncf") is not None:
        int8: dict[str, dict[str, object]] = {"quantize.nncf": {"data": calibration}}
    else:  # without the nncf extra: onnxruntime's static QDQ, which OpenVINO runs as int8 too
        int8 = {"quantize.static": {"calibration": "minmax", "data": calibration, "per_channel": True}}
    return (
        Candidate(name=f"{OPENVINO_PREFIX}f32", passes=(f32,)),
        Candidate(name=f"{OPENVINO_PREFIX}bf16", passes=(bf16,)),
        Candidate(name=f"{OPENVINO_PREFIX}int8", passes=(int8, f32)),
    )


def engine_skip(cand: Candidate) -> str | None:
    """Why an OpenVINO bf16 candidate is not tried on this CPU (None: try it).

    Without AMX-BF16 or AVX512-BF16, OpenVINO compiles a bf16 hint to f32 (measured on an AVX2-only AMD
    EPYC), so the candidate would be OpenVINO f32 under another name: it is recorded as skipped instead."""
    wants_bf16 = any(
        isinstance(p, dict) and (p.get("engine.openvino") or {}).get("precision") == "bf16" for p in cand.passes
    )
    have = cpu_features()
    if not wants_bf16 or any(have.get(f) for f in NEEDS["bf16"]):
        return None
    return (
        f"this CPU has none of {', '.join(NEEDS['bf16'])}: OpenVINO would run bf16 at f32 "
        f"(the {OPENVINO_PREFIX}f32 candidate)"
    )
