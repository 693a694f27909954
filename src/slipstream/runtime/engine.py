"""Engine: an onnxruntime session built from a bundle and a target, with checked inputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.manifest import MONITORING_OUTPUTS
from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.errors import EngineError, InputError, ProviderUnavailableError
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


class EngineInfo(BaseModel):
    """What an engine actually runs on: written back to reports and manifests."""

    model_config = ConfigDict(frozen=True)

    target: str
    providers: tuple[str, ...] = Field(description="Providers onnxruntime actually started, in order.")
    fallback: str | None = Field(description="Why the target's first provider is not in use, if it is not.")
    intra_op_threads: int
    execution_mode: str
    graph_optimization: str
    int8_kernels: str = Field(default="", description="Whether int8 QDQ runs fused on this CPU, and why.")
    from_bundle: tuple[str, ...] = Field(
        default=(), description="Settings taken from the bundle's tuned resolved['session'] (not set by the caller)."
    )


class Engine:
    """A ready-to-run onnxruntime session for one bundle on one target."""

    def __init__(self, bundle: Bundle, target: Target | None = None) -> None:
        self.bundle = bundle
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
        self.inputs: tuple[TensorSpec, ...] = bundle.manifest.inputs
        self.outputs: tuple[TensorSpec, ...] = bundle.manifest.outputs
        self._input_by_name = {s.name: s for s in self.inputs}
        self._output_names = [s.name for s in self.outputs]
        listed = bundle.manifest.resolved.get(MONITORING_OUTPUTS)
        in_graph = {o.name for o in self.session.get_outputs()}
        self.monitoring_outputs: tuple[str, ...] = tuple(
            n for n in (listed if isinstance(listed, dict) else {}) if n in in_graph and n not in self._output_names
        )

    def resolved(self) -> EngineInfo:
        """The settings actually in force, for manifests and reports."""
        return EngineInfo(
            target=self.target.name,
            providers=tuple(self.providers),
            fallback=self.fallback,
            intra_op_threads=self.target.resolved_intra_op_threads(),
            execution_mode=self.target.execution_mode,
            graph_optimization=self.target.graph_optimization,
            int8_kernels=self.int8_kernels,
            from_bundle=tuple(
                k for k in BUNDLE_SESSION_KEYS if getattr(self.target, k) != getattr(self.requested_target, k)
            ),
        )

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate names, dtypes and shapes; cast losslessly where numpy can. Raises InputError.

        The casts serve in-process callers (plain Python ints, float64 arrays). The server refuses a datatype
        other than the model's before this runs, as the Open Inference Protocol requires (serve/codec.py).
        """
        missing = [n for n in self._input_by_name if n not in feeds]
        extra = [n for n in feeds if n not in self._input_by_name]
        if missing or extra:
            expected = ", ".join(self._input_by_name)
            raise InputError(
                f"Expected inputs [{expected}]; got [{', '.join(feeds)}]"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
                + ".",
                input_name=(missing or extra)[0],
                hint="Send exactly the inputs listed by `slipstream inspect`.",
            )
        checked: dict[str, np.ndarray] = {}
        symbols: dict[str, int] = {}
        for name, spec in self._input_by_name.items():
            checked[name] = _check_one(spec, np.asarray(feeds[name]), symbols)
        return checked

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None, *, check: bool = True
    ) -> dict[str, np.ndarray]:
        """Run the model; returns the requested outputs (all by default, monitoring-only ones when named) by name."""
        names = list(outputs) if outputs is not None else self._output_names
        unknown = [n for n in names if n not in self._output_names and n not in self.monitoring_outputs]
        if unknown:
            raise InputError(
                f"Requested outputs {unknown} do not exist; the model has [{', '.join(self._output_names)}].",
                hint="Ask for outputs by the names `slipstream inspect` lists.",
            )
        arrays = self.check_inputs(feeds) if check else dict(feeds)
        try:
            results = self.session.run(names, arrays)
        except Exception as exc:  # onnxruntime's errors are untyped
            raise EngineError(f"onnxruntime failed while running '{self.bundle.manifest.name}': {exc}") from exc
        return dict(zip(names, results, strict=True))


def _castable(have: np.dtype[Any], want: np.dtype[Any]) -> bool:
    """Same-kind casts (float64 → float32) and integers into floats; never floats into integers."""
    if have.kind == want.kind:
        return True
    return have.kind in "biu" and want.kind in "fiu" and np.can_cast(have, want, casting="same_kind")


def _check_one(spec: TensorSpec, array: np.ndarray, symbols: dict[str, int]) -> np.ndarray:
    if spec.dtype == "bfloat16":
        raise InputError(f"Input '{spec.name}' is bfloat16, which numpy cannot carry.", input_name=spec.name)
    want = numpy_dtype(spec.dtype)
    if array.dtype != want:
        if spec.dtype == "string" and array.dtype.kind in "US":
            array = array.astype(object)
        elif _castable(array.dtype, want):
            array = array.astype(want)
        else:
            raise InputError(
                f"Input '{spec.name}' must be {spec.dtype}; got {array.dtype}.",
                input_name=spec.name,
                hint=f"Convert the data with .astype('{spec.dtype}').",
            )
    if array.ndim != spec.rank:
        raise InputError(
            f"Input '{spec.name}' must have shape {spec.shape_text()} (rank {spec.rank}); "
            f"got {list(array.shape)} (rank {array.ndim}).",
            input_name=spec.name,
            hint="Reshape the data to the model's rank.",
        )
    for axis, (dim, size) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if isinstance(dim, int) and dim != size:
            raise InputError(
                f"Input '{spec.name}' must have shape {spec.shape_text()}; got {list(array.shape)} "
                f"(axis {axis} must be {dim}).",
                input_name=spec.name,
                hint="Reshape the data, or re-export the model with a dynamic axis there.",
            )
        if isinstance(dim, str):
            seen = symbols.setdefault(dim, size)
            if seen != size:
                raise InputError(
                    f"Input '{spec.name}' axis {axis} is '{dim}', which another input set to {seen}; got {size}.",
                    input_name=spec.name,
                    hint=f"All inputs must agree on the size of '{dim}'.",
                )
    return array
