"""The model repository: ``repo/<model>/<version>/`` bundles (or one bundle), versions, hot reload.

A version takes traffic only after it has loaded, passed verification (every file's sha256, and a
parity record for a converted model) and run a warm-up batch. Loading happens in a worker thread;
the swap is one dict assignment on the event loop, so a request sees the old version or the new one,
never half of either. A version that fails keeps its reason in the index, the logs and the metrics,
and never displaces a good one. With ``signing.require_signature``, a version must also carry a model.sig that
verifies against the trusted key and covers every file (slipstream.artifact.signing); a refusal is counted in
``slipstream_signature_refusals_total{model,reason}``.

A failed version is retried on later scans with backoff (``ServeSettings.reload``), so a version whose
``manifest.json`` landed before its ``model.onnx`` was complete is served once the copy finishes; a
version whose directory or manifest is replaced is retried at once. Publish a version atomically anyway:
write it to a hidden sibling (``repo/model/.3.tmp``, skipped by scans) and rename it to ``repo/model/3``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from slipstream.artifact.bundle import MANIFEST_FILE, Bundle
from slipstream.artifact.manifest import Manifest
from slipstream.artifact.signing import TrustAnchor, check_signed_manifest, verify_bundle
from slipstream.artifact.specs import is_batchable, placeholder_feeds
from slipstream.errors import (
    ConfigError,
    IntegrityError,
    ModelNotFoundError,
    ServerBusyError,
    SignatureError,
    SlipstreamError,
)
from slipstream.monitor.process.placement import unpinned
from slipstream.runtime import EngineBase, Target, engine_choice, open_engine
from slipstream.serve.batching import Batcher, InlinePolicy
from slipstream.serve.metrics import ServeMetrics
from slipstream.serve.request import RequestedOutput
from slipstream.serve.settings import ServeSettings
from slipstream.serve.signature import Signature

if TYPE_CHECKING:
    from slipstream.monitor.process.proxy import RemoteMonitor
    from slipstream.monitor.process.serving import ServeMonitors

log = logging.getLogger("slipstream.serve")

State = Literal["LOADING", "READY", "UNAVAILABLE", "UNLOADED"]


def version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions sort by number, before any non-numeric name (which sort alphabetically)."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(eq=False)
class ModelVersion:
    """One version of one model and everything needed to serve it."""

    name: str
    version: str
    path: Path
    state: State = "LOADING"
    reason: str = ""
    failure: str = ""  # what failed, in general terms, for callers (reason, with paths and digests, is logged)
    stamp: tuple[int, ...] = ()  # identity of the directory and manifest; a change makes a rescan retry at once
    attempts: int = 0  # failed loads of these same files so far
    retry_at: float = 0.0  # when a rescan may retry a failed version (Repository.clock)
    engine: EngineBase | None = None
    batcher: Batcher | None = None
    batchable: bool = False
    load_s: float = 0.0
    warm_call_s: float = 0.0  # fastest warm-up call: decides whether the model runs inline
    output_names: tuple[str, ...] = field(default=())
    all_outputs: tuple[RequestedOutput, ...] = field(default=())  # what a request that names no outputs gets
    input_datatypes: dict[str, str] = field(default_factory=dict)  # input name -> the OIP datatype it must come as
    signature: Signature | None = None  # the one check every request's tensors pass before the batcher
    fetch: list[str] | None = None  # what the model call returns: None for the outputs, or those plus monitor-only
    monitor: RemoteMonitor | None = None  # set only when the server monitors

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batcher's model call. Its feeds passed :attr:`signature` (the batcher is fed only by
        ``InferenceCore.infer``), so onnxruntime takes them as they are, with no second check."""
        if self.engine is None:
            raise ServerBusyError(f"Model '{self.name}' version {self.version} is not loaded.")
        return self.engine.run(feeds, self.fetch, check=False)

    @property
    def manifest(self) -> Manifest:
        if self.engine is None:
            raise ServerBusyError(f"Model '{self.name}' version {self.version} is not loaded.")
        return self.engine.bundle.manifest


def has_parity_record(manifest: Manifest) -> bool:
    """A bundle converted from another framework must carry a passed parity proof; an ONNX import is the source.

    A conversion made with --skip-parity records ``status="skipped"``: it is not served.
    """
    if manifest.source.framework == "onnx":
        return True
    return manifest.parity is not None and manifest.parity.status == "passed"


def trust_anchor(settings: ServeSettings) -> TrustAnchor | None:
    """What every version's signature must verify against, or None when signatures are not required.

    Built once at start, so that a missing or malformed key stops the server before any model loads."""
    signing = settings.signing
    if not signing.require_signature:
        return None
    return TrustAnchor(public_key=signing.trusted_key, certificate_chain=signing.certificate_chain)


def load_version(entry: ModelVersion, settings: ServeSettings, trust: TrustAnchor | None = None) -> None:
    """Load, verify and warm one version (blocking; runs in a worker thread). Raises SlipstreamError.

    With ``trust``, the version's signature is checked first (it covers every file, manifest included), and the
    loaded manifest must list the signed digests: the files then loaded are checked against those."""
    started = time.perf_counter()
    signed = verify_bundle(entry.path, trust) if trust is not None else None
    bundle = Bundle.load(entry.path, verify=True)
    if signed is not None:
        check_signed_manifest(entry.path, signed, bundle.manifest)
    if not has_parity_record(bundle.manifest):
        raise IntegrityError(
            f"Bundle '{entry.path}' came from {bundle.manifest.source.framework} but records no passed parity "
            f"proof (parity: {bundle.manifest.parity.status if bundle.manifest.parity else 'none'}).",
            path=entry.path,
            file=MANIFEST_FILE,
            hint="Convert it again with `slipstream convert` (which proves parity), without --skip-parity.",
        )
    # The bundle's tuned thread count (resolved["session"], from the build) applies unless the server was
    # given its own; without either, the server's default.
    session = bundle.manifest.resolved.get("session")
    tuned = isinstance(session, dict) and "intra_op_threads" in session
    threads = None if tuned and "intra_op_threads" not in settings.model_fields_set else settings.intra_op_threads
    # OpenVINO's streams: the server's --streams, else the build's measured choice (taken by the engine).
    on_openvino = engine_choice(bundle.manifest).engine == "openvino"
    streams = settings.streams if on_openvino else None
    if settings.streams is not None and not on_openvino:
        log.info("--streams does not apply to %s: an onnxruntime bundle runs one batch at a time", entry.path)
    # The bundle's recorded engine (onnxruntime or OpenVINO), checked against this CPU's features.
    engine = open_engine(
        bundle,
        Target(intra_op_threads=threads, inter_op_threads=streams, missing_cpu_features=settings.missing_cpu_features),
    )
    feeds = placeholder_feeds(bundle.manifest.inputs)
    calls = []
    for _ in range(5):
        call_started = time.perf_counter()
        engine.run(feeds)
        calls.append(time.perf_counter() - call_started)
    entry.warm_call_s = min(calls)
    entry.engine = engine
    entry.batchable = is_batchable(bundle.manifest.inputs, bundle.manifest.outputs)
    entry.output_names = tuple(s.name for s in bundle.manifest.outputs)
    entry.all_outputs = tuple(RequestedOutput(n, None) for n in entry.output_names)
    entry.signature = Signature(bundle.manifest.inputs, non_finite=settings.guard.non_finite)
    entry.input_datatypes = entry.signature.datatypes
    entry.load_s = time.perf_counter() - started


def _stamp(path: Path) -> tuple[int, ...]:
    """Which directory and which manifest: a rename into place or a rewritten manifest changes it.

    Files growing in place (a copy in progress) leave it alone: those wait for the backoff.
    """
    try:
        folder, manifest = path.stat(), (path / MANIFEST_FILE).stat()
    except OSError:
        return ()
    return (folder.st_dev, folder.st_ino, manifest.st_ino, manifest.st_size, manifest.st_mtime_ns)


class Repository:
    """Every served model version, keyed by model name then version."""

    def __init__(
        self, root: Path, settings: ServeSettings, metrics: ServeMetrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not root.is_dir():
            raise ConfigError(
                f"Expected a bundle or a model repository directory at '{root}'; it does not exist.",
                field="path",
                hint="Pass a bundle from `slipstream convert`, or a directory laid out as <model>/<version>/.",
            )
        self.root = root
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self.unloaded: set[str] = set()
        self.monitors: ServeMonitors | None = None  # the app sets it when monitoring is on
        self.clock = clock
        self.trust = trust_anchor(settings)
        self._lock = asyncio.Lock()

    # -- discovery ----------------------------------------------------------------------------
    def discover(self) -> dict[str, dict[str, Path]]:
        """Model name → version → directory, as found on disk now."""
        if (self.root / MANIFEST_FILE).is_file():
            try:
                manifest = Bundle.load(self.root, verify=False).manifest
            except SlipstreamError:
                return {self.root.name: {"1": self.root}}
            return {manifest.name: {manifest.version: self.root}}
        found: dict[str, dict[str, Path]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = {v.name: v for v in model_dir.iterdir() if v.is_dir() and not v.name.startswith(".")}
            if versions:
                found[model_dir.name] = versions
        return found

    def _wanted(self, versions: dict[str, Path]) -> list[str]:
        names = sorted(versions, key=version_key)
        if self.settings.version_policy == "all":
            return names
        if self.settings.version_policy == "specific":
            return [v for v in names if v in self.settings.versions]
        return names[-1:]

    # -- loading ------------------------------------------------------------------------------
    async def load_all(self) -> None:
        for name in self.discover():
            await self.load(name)

    async def load(self, name: str, *, force: bool = True) -> None:
        """(Re)scan one model: load new or changed versions, then retire what the policy drops.

        A failed version is retried when its files were replaced, when ``force`` (an operator's /load), or
        once its backoff has passed (the poller passes ``force=False``).
        """
        async with self._lock:
            versions = self.discover().get(name)
            if versions is None:
                raise ModelNotFoundError(
                    f"No model '{name}' in the repository.",
                    hint="Add a <model>/<version>/ bundle directory, then load it.",
                )
            self.unloaded.discard(name)
            current = self.models.setdefault(name, {})
            latest = self.settings.version_policy == "latest"
            for version in self._candidates(versions):
                path = versions[version]
                old = current.get(version)
                if old is not None and old.state == "READY":
                    if latest:
                        break
                    continue
                entry = ModelVersion(name, version, path, stamp=_stamp(path))
                if old is not None and old.state == "UNAVAILABLE" and old.stamp == entry.stamp:
                    if not force and self.clock() < old.retry_at:
                        continue
                    entry.attempts = old.attempts  # the same files again: a retry, counted
                await self._load_one(current, entry)
                if latest and current[version].state == "READY":
                    break
            self._apply_policy(name, current)

    def _candidates(self, versions: dict[str, Path]) -> list[str]:
        # Under 'latest', try newest first and stop at the first one that is (or becomes) ready.
        wanted = self._wanted(versions)
        if self.settings.version_policy != "latest":
            return wanted
        return sorted(versions, key=version_key, reverse=True)

    def _load(self, entry: ModelVersion) -> None:
        # On every CPU the process may use, wherever this worker thread was placed: a version found after
        # startup gets the same inference pool as one loaded at startup (slipstream.monitor.process.placement).
        with unpinned(self.monitors.placement if self.monitors is not None else None):
            load_version(entry, self.settings, self.trust)

    async def _load_one(self, current: dict[str, ModelVersion], entry: ModelVersion) -> None:
        try:
            await asyncio.to_thread(self._load, entry)
        except SlipstreamError as exc:
            entry.state, entry.reason = "UNAVAILABLE", str(exc).replace("\n", " ")
            integrity = isinstance(exc, IntegrityError)
            entry.failure = "its files failed their integrity check" if integrity else "it failed to load"
            if isinstance(exc, SignatureError):
                entry.failure = "its signature was refused"
                self.metrics.signature_refusals.labels(entry.name, exc.reason).inc()
            entry.attempts += 1
            wait_s = self.settings.reload.backoff_s(entry.attempts)
            entry.retry_at = self.clock() + wait_s
            previous = current.get(entry.version)
            if previous is None or previous.state != "READY":
                current[entry.version] = entry
            self.metrics.load_failures.labels(entry.name, entry.version).inc()
            # One line per attempt, and attempts back off: a version left broken logs at most once a retry_max_s.
            polled = self.settings.poll_interval_s > 0
            log.log(
                logging.ERROR if entry.attempts == 1 else logging.WARNING,
                "refused model %s version %s (attempt %d; %s): %s",
                entry.name,
                entry.version,
                entry.attempts,
                f"retrying in {wait_s:.1f} s, or at once when its files are replaced"
                if polled
                else f"POST /v2/repository/models/{entry.name}/load to retry",
                entry.reason,
                extra={
                    "model": entry.name,
                    "version": entry.version,
                    "event": "load_failed",
                    "attempt": entry.attempts,
                },
            )
            return
        engine = entry.engine
        if engine is None:  # load_version always sets it; this keeps mypy honest without an assert
            return
        # With monitoring on, the monitor-only outputs (a classifier's penultimate embedding) ride along to
        # observe(); the reply encodes only the manifest's outputs, so clients never see them.
        extra = engine.monitoring_outputs if self.monitors is not None else ()
        entry.fetch = [*entry.output_names, *extra] if extra else None
        entry.batcher = Batcher(
            entry.run,
            self.settings.batching,
            batchable=entry.batchable,
            on_batch=self.metrics.model(entry.name).on_batch,
            name=f"{entry.name}-{entry.version}",
            inline=_inline_policy(self.settings, entry.warm_call_s),
            parallel=engine.parallel_requests,
        )
        entry.batcher.start()
        if self.monitors is not None:
            entry.monitor = await asyncio.to_thread(self.monitors.attach, entry)
        entry.state, entry.reason = "READY", ""
        current[entry.version] = entry
        # What is alive now (sessions, graphs, settings) lives as long as the version: move it out of the
        # collector's sight. Full collections then walk only per-request garbage: measured on the digits MLP
        # at 64 connections, p99 fell from ~30 to ~10 ms and the CPU a monitored request adds from ~15 to ~0 µs
        # (requests held for the monitor's 50 ms batches survive into the old generation and trigger them).
        if self.settings.gc_freeze:
            gc.freeze()
        self.metrics.load_seconds.labels(entry.name, entry.version).set(entry.load_s)
        self.metrics.model_ready.labels(entry.name, entry.version).set(1)
        log.info(
            "model %s version %s ready in %.3f s%s (model runs %s)",
            entry.name,
            entry.version,
            entry.load_s,
            f" after {entry.attempts} failed attempt(s)" if entry.attempts else "",
            {"never": "in a worker thread", "alone": "inline for a lone caller", "always": "inline"}[
                entry.batcher.inline
            ],
            extra={"model": entry.name, "version": entry.version, "event": "loaded"},
        )

    def _apply_policy(self, name: str, current: dict[str, ModelVersion]) -> None:
        if self.settings.version_policy != "latest":
            return
        ready = sorted((v for v, e in current.items() if e.state == "READY"), key=version_key)
        for version in ready[:-1]:
            self._retire(current[version], f"replaced by version {ready[-1]}")

    def _retire(self, entry: ModelVersion, reason: str) -> None:
        entry.state, entry.reason = "UNLOADED", reason
        self.metrics.model_ready.labels(entry.name, entry.version).set(0)
        if entry.batcher is not None:
            asyncio.get_running_loop().create_task(_drain_and_stop(entry.batcher, self.monitors, entry))
        log.info("model %s version %s unloaded: %s", entry.name, entry.version, reason)

    async def unload(self, name: str) -> None:
        async with self._lock:
            current = self.models.get(name)
            if current is None:
                raise ModelNotFoundError(f"No model '{name}' is loaded.", hint="POST /v2/repository/index lists them.")
            for entry in current.values():
                if entry.state == "READY":
                    self._retire(entry, "unloaded on request")
            self.unloaded.add(name)

    async def rescan(self) -> None:
        """Pick up new models and versions, and retry failed ones whose backoff has passed (the poller)."""
        for name in self.discover():
            if name not in self.unloaded:
                await self.load(name, force=False)

    async def close(self) -> None:
        for current in self.models.values():
            for entry in current.values():
                if entry.batcher is not None:
                    await entry.batcher.stop()
        if self.monitors is not None:  # after the batchers: everything served is observed, then logged
            await asyncio.to_thread(self.monitors.close)

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str, version: str | None) -> ModelVersion:
        current = self.models.get(name)
        if not current:
            raise ModelNotFoundError(
                f"No model named '{name}'; serving [{', '.join(sorted(self.models))}].",
                hint="GET /v2/models/{name} with one of those names.",
            )
        if version is None:
            if len(current) == 1:  # the common case, on every request: one version, serving
                (only,) = current.values()
                if only.state == "READY":
                    return only
            ready = [v for v, e in current.items() if e.state == "READY"]
            if not ready:
                raise ServerBusyError(f"Model '{name}' has no ready version.", retry_after_s=1.0)
            return current[max(ready, key=version_key)]
        entry = current.get(version)
        if entry is None:
            raise ModelNotFoundError(
                f"Model '{name}' has no version '{version}'; it has [{', '.join(sorted(current, key=version_key))}].",
                hint="Leave the version out to use the newest ready one.",
            )
        if entry.state != "READY":
            # The reason names files, digests and onnxruntime's message: the log gets it, the caller does not.
            busy = ServerBusyError(
                f"Model '{name}' version {version} is {entry.state.lower()}"
                + (f": {entry.failure}." if entry.failure and entry.state == "UNAVAILABLE" else "."),
                retry_after_s=1.0,
            )
            if entry.reason:
                busy.add_note(entry.reason)
            raise busy
        return entry

    def find(self, name: str, version: str | None) -> ModelVersion | None:
        """What :meth:`get` answers, or None where it would refuse (for counting, never for serving)."""
        try:
            return self.get(name, version)
        except SlipstreamError:
            return None

    def ready(self) -> bool:
        """True once every model that should serve has a ready version."""
        live = [n for n in self.models if n not in self.unloaded]
        return bool(live) and all(any(e.state == "READY" for e in self.models[n].values()) for n in live)

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        rows = []
        for name in sorted(self.models):
            for version in sorted(self.models[name], key=version_key):
                entry = self.models[name][version]
                if ready_only and entry.state != "READY":
                    continue
                rows.append({"name": name, "version": version, "state": entry.state, "reason": entry.reason})
        return rows


def _inline_policy(settings: ServeSettings, warm_call_s: float) -> InlinePolicy:
    mode = settings.batching.compute
    if mode == "auto":
        return "alone" if warm_call_s * 1000.0 < settings.batching.inline_below_ms else "never"
    return "always" if mode == "inline" else "never"


async def _drain_and_stop(
    batcher: Batcher, monitors: ServeMonitors | None, entry: ModelVersion, grace_s: float = 30.0
) -> None:
    """Let a retired version answer what it already holds, then stop it (and its monitor)."""
    deadline = time.monotonic() + grace_s
    while (len(batcher.queue) or batcher.queue.joining) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await batcher.stop()
    if monitors is not None:
        await asyncio.to_thread(monitors.detach, entry)
