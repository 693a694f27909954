"""OpenVINO as a second engine: the bundle's ONNX compiled for the CPU plugin, behind the same checks.

OpenVINO reads model.onnx directly (from the verified bytes, as onnxruntime does). The target maps onto it:
``intra_op_threads`` → ``INFERENCE_NUM_THREADS``, ``inter_op_threads`` → ``NUM_STREAMS`` (parallel
inference streams; 1 by default, latency first). ``execution_mode`` and ``graph_optimization`` are
onnxruntime's and do not apply; OpenVINO optimizes the graph itself.

The precision hint is always set: OpenVINO's default is bf16 on CPUs with AMX, which would change the
numbers silently. It runs bf16 only when the bundle's choice says so, and reports what it compiled to: a
CPU without bf16 kernels compiles a bf16 hint to f32 (measured on an AVX2-only AMD EPYC), which is a warning.

An infer request is not thread-safe; each call takes one from a small pool (making one when all are busy),
so concurrent callers (the server's batches of two models, say) never share one.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.errors import EngineError, MissingDependencyError
from slipstream.runtime.base import EngineBase, EngineInfo
from slipstream.runtime.choice import InferencePrecision, model_precision
from slipstream.runtime.targets import Target

log = logging.getLogger(__name__)
DEVICE = "CPU"


def import_openvino() -> Any:
    """The openvino module, or MissingDependencyError naming the extra."""
    try:
        import openvino
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("openvino", extra="openvino", feature="The OpenVINO engine") from exc
    return openvino


def openvino_available() -> bool:
    """Whether the openvino extra is installed (the build adds OpenVINO candidates only then)."""
    try:
        import_openvino()
    except MissingDependencyError:
        return False
    return True


def _type_name(value: Any) -> str:
    """An OpenVINO element type as 'f32' / 'bf16' (properties come back as ov.Type)."""
    get = getattr(value, "get_type_name", None)
    return str(get()) if callable(get) else str(value)


class OpenVinoEngine(EngineBase):
    """A bundle compiled by OpenVINO for the CPU, at an explicit inference precision."""

    def __init__(
        self,
        bundle: Bundle,
        target: Target | None = None,
        *,
        inference_precision: InferencePrecision = "f32",
        warnings: tuple[str, ...] = (),
    ) -> None:
        ov = import_openvino()
        self.bundle = bundle
        self.requested_target = target or Target()
        self.target = self.requested_target.with_bundle_session(bundle.manifest.resolved.get("session"))
        self.requested_precision = inference_precision
        self.streams = self.target.inter_op_threads or 1
        started = time.perf_counter()
        core = ov.Core()
        data = bundle.read_model_bytes()
        config = {
            "INFERENCE_PRECISION_HINT": inference_precision,
            "INFERENCE_NUM_THREADS": self.target.resolved_intra_op_threads(),
            "NUM_STREAMS": self.streams,
        }
        try:
            # External data (models over 2 GB) is read from the bundle directory, whose files were just verified.
            model = core.read_model(str(bundle.model_path)) if data.external_data else core.read_model(data.model)
            self.compiled = core.compile_model(model, DEVICE, config)
        except Exception as exc:  # OpenVINO raises untyped RuntimeErrors
            raise EngineError(
                f"OpenVINO could not compile '{bundle.path}' for {DEVICE}: {exc}",
                hint="Run the bundle on onnxruntime (build without the engine.openvino step), or check that "
                "this OpenVINO supports every operator of the model (`slipstream inspect`).",
            ) from exc
        self.load_time_s = time.perf_counter() - started
        self.compiled_precision = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self.capabilities = tuple(str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
        notes = list(warnings)
        if self.compiled_precision != inference_precision:
            notes.append(
                f"OpenVINO compiled '{bundle.manifest.name}' at {self.compiled_precision}, not the "
                f"{inference_precision} recorded in the bundle: this CPU's OpenVINO capabilities are "
                f"{', '.join(self.capabilities)}"
            )
            log.warning("%s", notes[-1])
        self.warnings = tuple(notes)
        self._ports: dict[str, Any] = {}
        for port in self.compiled.outputs:
            for name in port.get_names():
                self._ports.setdefault(name, port)
        self._set_io(bundle, self._ports)
        missing = [s.name for s in self.outputs if s.name not in self._ports]
        if missing:
            raise EngineError(
                f"OpenVINO's compiled '{bundle.manifest.name}' has no output named {missing}; "
                f"it has {sorted(self._ports)}.",
                hint="Re-export the model with unique output names, or run it on onnxruntime.",
            )
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def resolved(self) -> EngineInfo:
        weights = model_precision(self.bundle.manifest)
        precision = weights if weights != "fp32" else {"bf16": "bf16"}.get(self.compiled_precision, "fp32")
        return EngineInfo(
            target=self.target.name,
            engine="openvino",
            precision=precision,
            providers=(f"OpenVINO {DEVICE}",),
            fallback=None,
            intra_op_threads=self.threads,
            streams=self.streams,
            execution_mode="openvino",
            graph_optimization="openvino",
            int8_kernels=f"OpenVINO {DEVICE} capabilities: {', '.join(self.capabilities)}",
            warnings=self.warnings,
        )

    def _infer(self, arrays: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            results = request.infer(dict(arrays))
            return {n: np.asarray(results[self._ports[n]]) for n in names}
        except Exception as exc:  # OpenVINO's errors are untyped
            raise EngineError(f"OpenVINO failed while running '{self.bundle.manifest.name}': {exc}") from exc
        finally:
            self._requests.put(request)
