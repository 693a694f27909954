"""OpenVINO as a second engine: the bundle's ONNX compiled for the CPU plugin, behind the same checks.

OpenVINO reads model.onnx directly (from the verified bytes, as onnxruntime does). The target maps onto it:
``intra_op_threads`` → ``INFERENCE_NUM_THREADS``, ``inter_op_threads`` → ``NUM_STREAMS`` (parallel
inference streams; 1 by default, latency first). ``execution_mode`` and ``graph_optimization`` are
onnxruntime's and do not apply; OpenVINO optimizes the graph itself.

The precision hint is always set: OpenVINO's default is bf16 on CPUs with AMX, which would change the
numbers silently. It runs bf16 only when the bundle's choice says so, and reports what it compiled to: a
CPU without bf16 kernels compiles a bf16 hint to f32 (measured on an AVX2-only AMD EPYC), which is a warning.

An infer request is not thread-safe; each call takes one from a small pool (making one when all are busy),
so concurrent callers (the server's batches of two models, say) never share one. A failed call compiles the
model again (see ``_heal``): OpenVINO's compiled model can stay broken after one. With several streams, the
compiled model's ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` is :attr:`parallel_requests`: the server keeps that
many batches in flight, each a synchronous ``infer`` in its own thread (GIL released): on MiniLM f32 at batch
32 on 2 cores, two streams that way gave 1.12-1.25× one stream's throughput, and ``AsyncInferQueue``
1.14-1.18×, the same within noise (benchmarks/serve_minilm.py). Streams stay 1 unless the target asks: each
stream then has half the threads, so one batch takes about twice as long.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
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
            self._recompile: Callable[[], Any] = lambda: core.compile_model(model, DEVICE, config)
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
        self._parallel = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._live = _Requests(self.compiled, self._parallel)
        self._healing = threading.Lock()
        self.recompiles = 0  # compiled again after a failed call (see _heal)
        self._set_io(bundle, self._live.ports)
        missing = [s.name for s in self.outputs if s.name not in self._live.ports]
        if missing:
            raise EngineError(
                f"OpenVINO's compiled '{bundle.manifest.name}' has no output named {missing}; "
                f"it has {sorted(self._live.ports)}.",
                hint="Re-export the model with unique output names, or run it on onnxruntime.",
            )

    @property
    def parallel_requests(self) -> int:
        """The compiled model's optimal number of infer requests: its streams (1 unless the target's
        ``inter_op_threads`` asks for more)."""
        return self._parallel

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
        feeds = dict(arrays)
        outputs = self._attempt(feeds, names)
        if isinstance(outputs, Exception):  # maybe for another call's bad values (see _heal): once more, fresh
            outputs = self._attempt(feeds, names)
        if isinstance(outputs, Exception):
            raise EngineError(f"OpenVINO failed while running '{self.bundle.manifest.name}': {outputs}") from outputs
        return outputs

    def _attempt(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray] | Exception:
        """One call on the live compiled model: its outputs, or OpenVINO's error after healing the model."""
        live = self._live
        request = live.take()
        try:
            results = request.infer(feeds)
            outputs = {n: np.asarray(results[live.ports[n]]) for n in names}
        except Exception as exc:  # OpenVINO's errors are untyped
            self._heal(live)
            return exc
        live.give(request)
        return outputs

    def _heal(self, failed: _Requests) -> None:
        """Compile the model again after a failed call. Measured with OpenVINO 2026.4 (CPU plugin): a call that
        fails in shape inference (a value-dependent broadcast) leaves the compiled model failing every later
        call, on fresh infer requests and good inputs too, so one caller's bad values would break the model for
        everyone, and a call running beside it may fail for it. So a failed call is healed and tried once more
        on the new compiled model: only a call that fails there too is the caller's error. Calls still running
        on the old compiled model finish there; later calls use the new one."""
        with self._healing:
            if self._live is not failed:  # another thread healed it already
                return
            try:
                compiled = self._recompile()
            except Exception:  # keep serving on the old one; the caller still gets its own error
                log.exception("OpenVINO could not recompile '%s' after a failed call", self.bundle.manifest.name)
                return
            self.compiled, self._live = compiled, _Requests(compiled, self._parallel)
            self.recompiles += 1
            log.warning("OpenVINO recompiled '%s' after a failed call", self.bundle.manifest.name)


class _Requests:
    """One compiled model's infer requests: a call takes one (made on the spot when all are busy), then gives it
    back; a request is never shared by two calls at once."""

    def __init__(self, compiled: Any, count: int) -> None:
        self._compiled = compiled
        self.ports: dict[str, Any] = {}  # output name -> this compiled model's port (the key of a result)
        for port in compiled.outputs:
            for name in port.get_names():
                self.ports.setdefault(name, port)
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(count):  # made now, so the first concurrent calls do not pay for them
            self._free.put(compiled.create_infer_request())

    def take(self) -> Any:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return self._compiled.create_infer_request()

    def give(self, request: Any) -> None:
        self._free.put(request)
