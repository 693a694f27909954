"""The one inference pipeline every front end calls: HTTP (``app.py``) and gRPC share it.

A front end authenticates the caller, resolves the model, decodes its wire format into one
:class:`~slipstream.serve.request.InferenceRequest` and hands it to :meth:`InferenceCore.infer`: one
signature check that lists every problem, the out-of-distribution screen, the batcher, the monitor and
the metrics. Every refusal is a :class:`~slipstream.errors.SlipstreamError` whose ``status_code`` the front
end maps to its protocol, with ``str(exc)`` as the text, so REST and gRPC refuse with the same words.
:meth:`InferenceCore.finish` counts a request once, whichever front end answered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipstream.errors import (
    ModelNotFoundError,
    OutOfDistributionError,
    ProtocolError,
    ServerBusyError,
    ServingError,
    SlipstreamError,
)
from slipstream.serve.codec import datatype
from slipstream.serve.guard import Guard
from slipstream.serve.metrics import ServeMetrics
from slipstream.serve.replies import client_fault, tensor_parameters
from slipstream.serve.repository import ModelVersion, Repository
from slipstream.serve.request import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    RequestedOutput,
    TensorMetadata,
)
from slipstream.serve.settings import ServeSettings

if TYPE_CHECKING:
    from slipstream.artifact.tensor import TensorSpec
    from slipstream.monitor.process.serving import ServeMonitors

log = logging.getLogger("slipstream.serve")

EXTENSIONS = ("binary_tensor_data", "model_repository")
REJECTION_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


def reason_of(exc: BaseException) -> str | None:
    """A rejection reason more precise than the status, where the error carries one."""
    return getattr(exc, "reason", None) if isinstance(exc, OutOfDistributionError) else None


class InferenceCore:
    """A repository of models behind one guard, one set of metrics and (optionally) one monitor process."""

    def __init__(self, root: Path, settings: ServeSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.metrics = ServeMetrics()
        self.guard = Guard(settings.guard, host=settings.host, clock=clock)
        self.repository = Repository(root, settings, self.metrics)
        self.draining = False
        self.clock = clock
        self._poller: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self.monitors: ServeMonitors | None = None
        if settings.monitor.enabled:  # only then is slipstream.monitor imported at all
            from slipstream.monitor.process.serving import ServeMonitors, register_collectors

            self.monitors = ServeMonitors(settings.monitor)
            register_collectors(self.monitors, self.metrics.registry)
            self.repository.monitors = self.monitors

    # -- life -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model (refusing to start with none servable), then the poller and the monitor pump."""
        await self.repository.load_all()
        if not any(e.state == "READY" for versions in self.repository.models.values() for e in versions.values()):
            rows = self.repository.index(ready_only=False)
            raise ServingError(
                f"No model could be served from '{self.repository.root}': "
                + ("; ".join(f"{r['name']} {r['version']}: {r['reason']}" for r in rows) or "it holds no bundles")
                + ".",
                hint="Fix or rebuild the bundles listed above.",
            )
        loop = asyncio.get_running_loop()
        if self.settings.poll_interval_s > 0:
            self._poller = loop.create_task(self._poll())
        if self.monitors is not None:
            self._pump = loop.create_task(self.monitors.pump())
            self.monitors.place_event_loop()

    async def stop(self) -> None:
        self.draining = True
        for task in (self._pump, self._poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.repository.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.repository.rescan()
            except (SlipstreamError, OSError) as exc:  # a repository mid-change: report it, keep serving
                log.error("repository rescan failed: %s", exc, extra={"event": "rescan_failed"})

    # -- callers --------------------------------------------------------------------------------
    def authenticate(self, headers: Iterable[tuple[bytes, bytes]], client: str) -> str:
        """The caller's identity (a key digest, or its address without keys), after its rate limit."""
        caller = self.guard.authenticate(headers, client)
        self.guard.rate_limit(caller)
        return caller

    def authorize_admin(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.guard.authorize_admin(headers)

    # -- models ---------------------------------------------------------------------------------
    def model(self, name: str, version: str | None) -> ModelVersion:
        """The version serving ``name`` (newest ready one without ``version``); 404 or 503 otherwise."""
        return self.repository.get(name, version)

    def input_datatypes(self, entry: ModelVersion) -> dict[str, str]:
        """Input name -> the OIP datatype it must come as (what a decoder without a datatype field needs)."""
        return entry.input_datatypes

    async def infer(
        self, entry: ModelVersion, request: InferenceRequest, *, request_id: str, caller: str, started: float
    ) -> InferenceResponse:
        """Check, screen, batch, run, observe. Raises SlipstreamError subclasses only."""
        batcher, signature, monitor = entry.batcher, entry.signature, entry.monitor
        if batcher is None or signature is None:
            raise ModelNotFoundError(f"Model '{entry.name}' is not loaded.")
        metrics = self.metrics
        metrics.in_flight += 1
        try:
            feeds = signature.check(request.inputs)
            wanted = wanted_outputs(request.outputs, entry)
            screening = None
            if monitor is not None and self.monitors is not None and self.monitors.screening:
                screening = monitor.screen(feeds)
                if screening.reject:
                    raise OutOfDistributionError(
                        f"The input is out of distribution (score {screening.max_score:.3g}, this server refuses "
                        f"above {self.settings.monitor.ood_reject_above:g}).",
                        hint="Send inputs like the data the model was built on.",
                    )
            if entry.state != "READY":  # retired while the request came in: its batcher may be stopped already
                raise ServerBusyError(
                    f"Model '{entry.name}' version {entry.version} was retired while the request was being read.",
                    hint="Retry: the request goes to the version serving now.",
                    retry_after_s=1.0,
                )
            arrays = list(feeds.values())
            rows = arrays[0].shape[0] if entry.batchable else 1
            # The signature fixed every dtype: requests batch together when their non-batch axes agree.
            key = arrays[0].shape[1:] if len(arrays) == 1 else tuple(a.shape[1:] for a in arrays)
            with batcher.slot() as slot:
                results, queue_s = await slot.infer(feeds, rows, key)
        except SlipstreamError as exc:  # onnxruntime failing on the request's values is the client's 400
            fault = client_fault(exc, entry.engine.inputs if entry.engine is not None else ())
            if fault is exc:
                raise
            raise fault from exc
        finally:
            metrics.in_flight -= 1
        metrics.model(entry.name).queue.observe(queue_s)
        if monitor is not None:
            params, group = request.parameters, None
            if params is not None and self.monitors is not None:
                value = params.get(self.monitors.settings.group_parameter)
                group = None if value is None else str(value)
            monitor.observe(
                request.id or request_id,
                feeds,
                results,
                latency_s=self.clock() - started,
                group=group,
                key_id=caller[:16] if self.guard.auth_required else caller,  # a digest prefix, never the key
                screening=screening,
            )
        return InferenceResponse(entry.name, entry.version, request.id, results, wanted)

    def finish(
        self,
        model: str,
        version: str,
        status: int,
        reason: str | None,
        started: float,
        *,
        path_model: tuple[str, str | None] | None = None,
        entry: ModelVersion | None = None,
    ) -> None:
        """Count one request: the per-model series (when it reached a model), rejections, and the monitor's
        security counters. ``entry`` is the version the request resolved, when it got that far;
        ``path_model`` names the model a refused request was for (from its route), looked up only then."""
        if status >= 400:
            label = reason or REJECTION_REASONS.get(status, str(status))
            self.metrics.rejections.labels(label).inc()
            if self.monitors is not None:
                self._count_security(status, label, entry, model, version, path_model)
        if model:
            self.metrics.count_request(model, version, status)
            self.metrics.model(model).total.observe(self.clock() - started)

    def _count_security(
        self,
        status: int,
        reason: str,
        entry: ModelVersion | None,
        model: str,
        version: str,
        path_model: tuple[str, str | None] | None,
    ) -> None:
        """Refusals of a model's requests, and failed authentication on a model's endpoints, per monitor."""
        if entry is None:
            named = (model, version or None) if model else path_model
            if named is None:
                return
            entry = self.repository.find(*named)
        if entry is None or entry.monitor is None:
            return
        if status == 401:
            entry.monitor.counters.auth_failed("missing_or_unknown_key")
        elif reason != OutOfDistributionError.reason:  # screen() counted that one itself
            entry.monitor.counters.rejected(reason)

    # -- health and metadata ----------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.repository.ready() and not self.draining

    def model_ready(self, name: str, version: str | None) -> bool:
        """Whether ``name`` (``version``) takes requests now; an unknown model or version is a 404."""
        try:
            return self.repository.get(name, version).state == "READY"
        except ModelNotFoundError:
            raise
        except SlipstreamError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        from slipstream import __version__

        return {"name": "slipstream", "version": __version__, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        manifest = self.repository.get(name, version).manifest
        versions = [version] if version else [r["version"] for r in self.repository.index(True) if r["name"] == name]
        return ModelMetadata(
            name=name,
            versions=tuple(versions),
            platform="onnxruntime_onnx",
            inputs=tuple(_tensor_metadata(s) for s in manifest.inputs),
            outputs=tuple(_tensor_metadata(s) for s in manifest.outputs),
        )

    def repository_index(self, ready_only: bool) -> list[dict[str, str]]:
        return self.repository.index(ready_only=ready_only)

    async def load(self, name: str) -> None:
        await self.repository.load(name)

    async def unload(self, name: str) -> None:
        await self.repository.unload(name)


def _tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    # ranges, axis limits, quantization: only where the graph told us (plain OIP otherwise)
    return TensorMetadata(
        name=spec.name,
        datatype=datatype(spec.dtype),
        shape=tuple(d if isinstance(d, int) else -1 for d in spec.shape),
        parameters=tensor_parameters(spec),
    )


def wanted_outputs(requested: tuple[RequestedOutput, ...] | None, entry: ModelVersion) -> tuple[RequestedOutput, ...]:
    """The outputs to send back: those asked for (each must exist), or every output of the model."""
    if requested is None:
        return entry.all_outputs
    names = entry.output_names
    unknown = [r.name for r in requested if r.name not in names]
    if unknown:
        raise ProtocolError(
            f"Requested outputs {unknown} do not exist; '{entry.name}' has [{', '.join(names)}].",
            hint="Ask for outputs by the names GET /v2/models/{name} lists.",
        )
    return requested
