"""Engine: an onnxruntime session built from a bundle and a target, with checked inputs (runtime/base.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from slipstream.artifact.bundle import Bundle
from slipstream.errors import EngineError, ProviderUnavailableError
from slipstream.runtime.base import EngineBase, EngineInfo
from slipstream.runtime.choice import model_precision
from slipstream.runtime.targets import BUNDLE_SESSION_KEYS, PROVIDER_PACKAGES, Target, int8_fusion

log = logging.getLogger(__name__)

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def full_range_int8(resolved: Mapping[str, object]) -> bool:
    """Whether a bundle's int8 weights use the full 8-bit range: a pre-quantized import (TFLite int8), or a
    quantize.static step that did not take 7-bit weights (bundles made before it was recorded did not)."""
    if resolved.get("quantized") is True:
        return True
    return any(
        key.split("#")[0] == "quantize.static" and isinstance(value, dict) and value.get("reduce_range") is not True
        for key, value in resolved.items()
    )


def _session_options(target: Target, *, fuse_int8: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if not fuse_int8:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.intra_op_num_threads = target.resolved_intra_op_threads()
    if target.inter_op_threads is not None:
        opts.inter_op_num_threads = target.inter_op_threads
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if target.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    opts.graph_optimization_level = _GRAPH_LEVELS[target.graph_optimization]
    if target.intra_op_spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if target.intra_op_spinning else "0")
    opts.log_severity_level = 3
    return opts


def _choose_providers(target: Target) -> tuple[list[str], str | None]:
    """The providers to request, and a note when the target's first choice had to be dropped."""
    available = set(ort.get_available_providers())
    wanted = list(target.providers)
    missing = [p for p in wanted if p not in available]
    if not missing:
        return wanted, None
    first = wanted[0]
    if first in missing and not target.allow_fallback:
        raise ProviderUnavailableError(
            f"Target '{target.name}' needs {first}, but this onnxruntime offers only {', '.join(sorted(available))}.",
            provider=first,
            hint=f"Install {PROVIDER_PACKAGES.get(first, 'an onnxruntime build with it')}, "
            "or pass --allow-fallback to run on the next available provider (recorded).",
        )
    chosen = [p for p in wanted if p in available]
    return chosen, f"requested {', '.join(wanted)}; unavailable: {', '.join(missing)}"


class Engine(EngineBase):
    """A ready-to-run onnxruntime session for one bundle on one target."""

    def __init__(self, bundle: Bundle, target: Target | None = None, *, warnings: tuple[str, ...] = ()) -> None:
        self.bundle = bundle
        self.warnings = warnings  # from open_engine: the bundle's recorded choice against this machine
        # The build's tuned settings (resolved["session"]) apply wherever the caller did not set its own.
        self.requested_target = target or Target()
        self.target = self.requested_target.with_bundle_session(bundle.manifest.resolved.get("session"))
        requested, fallback = _choose_providers(self.target)
        started = time.perf_counter()
        # The bytes hashed are the bytes loaded: read once through the bundle directory (no symlinks, no
        # paths outside it), checked against the manifest, then handed to onnxruntime from memory.
        model = bundle.read_model_bytes()
        fuse_int8, self.int8_kernels = int8_fusion(full_range_int8(bundle.manifest.resolved))
        options = _session_options(self.target, fuse_int8=fuse_int8)
        external = model.external_files()
        if external:
            options.add_external_initializers_from_files_in_memory(
                list(external), list(external.values()), [len(b) for b in external.values()]
            )
        try:
            self.session = ort.InferenceSession(model.model, sess_options=options, providers=requested)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise EngineError(
                f"onnxruntime could not build a session for '{bundle.path}': {exc}",
                hint="Run `slipstream inspect` on the bundle; an operator or opset this onnxruntime lacks "
                "gives this error.",
            ) from exc
        self.load_time_s = time.perf_counter() - started
        self.providers: list[str] = list(self.session.get_providers())
        if self.providers[0] != requested[0]:
            # onnxruntime drops a provider it cannot initialise (e.g. CUDA libraries missing) silently.
            if not self.target.allow_fallback:
                raise ProviderUnavailableError(
                    f"onnxruntime did not start {requested[0]} for target '{self.target.name}'; "
                    f"the session runs on {', '.join(self.providers)}.",
                    provider=requested[0],
                    hint=f"Check the install of {PROVIDER_PACKAGES.get(requested[0], requested[0])}, "
                    "or pass --allow-fallback.",
                )
            fallback = f"{fallback + '; ' if fallback else ''}{requested[0]} failed to start"
        self.fallback = fallback
        if fallback:
            log.warning("Engine for %s runs on %s (%s)", bundle.path, self.providers[0], fallback)
        self._set_io(bundle, (o.name for o in self.session.get_outputs()))

    def resolved(self) -> EngineInfo:
        """The settings actually in force, for manifests and reports."""
        return EngineInfo(
            target=self.target.name,
            precision=model_precision(self.bundle.manifest),
            providers=tuple(self.providers),
            fallback=self.fallback,
            intra_op_threads=self.target.resolved_intra_op_threads(),
            execution_mode=self.target.execution_mode,
            graph_optimization=self.target.graph_optimization,
            int8_kernels=self.int8_kernels,
            from_bundle=tuple(
                k for k in BUNDLE_SESSION_KEYS if getattr(self.target, k) != getattr(self.requested_target, k)
            ),
            warnings=self.warnings,
        )

    def _infer(self, arrays: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(names, dict(arrays))
        except Exception as exc:  # onnxruntime's errors are untyped
            raise EngineError(f"onnxruntime failed while running '{self.bundle.manifest.name}': {exc}") from exc
        return dict(zip(names, results, strict=True))


__all__ = ["Engine", "EngineInfo", "full_range_int8"]
