"""Open a bundle on the engine its manifest records (runtime/choice.py), checked against this CPU."""

from __future__ import annotations

import logging

from slipstream.artifact.bundle import Bundle
from slipstream.errors import EngineError
from slipstream.runtime.base import EngineBase
from slipstream.runtime.choice import engine_choice, feature_warning, missing_features
from slipstream.runtime.targets import Target

log = logging.getLogger(__name__)


def open_engine(bundle: Bundle, target: Target | None = None, *, flags: frozenset[str] | None = None) -> EngineBase:
    """The engine the bundle's recorded choice names (onnxruntime when it records none), on ``target``.

    When the choice needs CPU features this machine lacks (bf16 without AMX/AVX512-BF16, int8 without VNNI),
    it warns with what the build measured and what the lack costs, or refuses when the target says
    ``missing_cpu_features="refuse"``. Nothing changes precision silently. ``flags``: this CPU's feature flags
    (read from /proc/cpuinfo when None).
    """
    tgt = target or Target()
    choice = engine_choice(bundle.manifest)
    warnings: tuple[str, ...] = ()
    missing = missing_features(choice, flags)
    if missing:
        text = feature_warning(choice, bundle.manifest.name, missing, flags)
        if tgt.missing_cpu_features == "refuse":
            raise EngineError(
                text,
                hint="Rebuild the bundle on this machine (the build picks the engine per CPU), or load it with "
                "missing_cpu_features='warn' to run it anyway.",
            )
        log.warning("%s", text)
        warnings = (text,)
    if choice.engine == "openvino":
        from slipstream.runtime.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(bundle, tgt, inference_precision=choice.inference_precision, warnings=warnings)
    from slipstream.runtime.engine import Engine

    return Engine(bundle, tgt, warnings=warnings)
