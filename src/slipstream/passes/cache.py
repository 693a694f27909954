"""The pass cache: results keyed by (input model digest, pass name@version, config hash), on disk.

Each entry is a bundle, so it is written atomically and verified like one when read: an entry whose
files do not match their recorded digests, or whose manifest was edited, is dropped and recomputed,
never returned. Two kinds of entry: the model and payload of an ONNX pass (``get``/``put``), and the
whole bundle of a step that makes one from something else, export or import (``get_bundle``/``put_bundle``),
parity proof and lineage included. The build keeps no cache of its own beside this one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.artifact.manifest import Manifest, Source
from slipstream.artifact.specs import graph_io_specs
from slipstream.errors import BundleError

if TYPE_CHECKING:
    import onnx

    from slipstream.passes.base import PassOutput

log = logging.getLogger(__name__)

ENV_VAR = "SLIPSTREAM_CACHE_DIR"


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$SLIPSTREAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/slipstream/passes``, else ``~/.cache/slipstream/passes``."""
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "slipstream" / "passes"


def _without_entry(manifest: Manifest) -> Manifest:
    resolved = {k: v for k, v in manifest.resolved.items() if k != "cache_entry"}
    return manifest.model_copy(update={"resolved": resolved})


def _manifest_digest(manifest: Manifest) -> str:
    """The digest of what a cached bundle's manifest says (not what the writer sets: time, files, versions)."""
    fields = {"created_at", "files", "slipstream_version", "schema_version"}
    return sha256_json(_without_entry(manifest).model_dump(mode="json", exclude=fields))


def _payload_digest(resolved: object, warnings: object, metrics: object) -> str:
    return sha256_json({"resolved": resolved, "warnings": warnings, "metrics": metrics})


class PassCache:
    """A directory of pass results. Safe to share between processes (writes are atomic renames)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"PassCache({str(self.root)!r})"

    @classmethod
    def default(cls, environ: Mapping[str, str] | None = None) -> PassCache:
        return cls(default_cache_dir(environ))

    @staticmethod
    def key(input_sha256: str, step_name: str, config_hash: str) -> str:
        return sha256_json([input_sha256, step_name, config_hash])

    def entry_path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def _verified(
        self, key: str, pass_name: str, intact: Callable[[Bundle, dict[str, Any]], bool]
    ) -> tuple[Bundle, dict[str, Any], onnx.ModelProto] | None:
        """The entry of ``key``: its files checked against their digests, its owner (key and pass) checked, and
        its manifest (which the file digests do not cover) checked by ``intact``. None when absent or damaged
        (a damaged entry is removed, so the caller recomputes it)."""
        path = self.entry_path(key)
        if not path.exists():
            return None
        try:
            bundle = Bundle.load(path, verify=True)
            entry = bundle.manifest.resolved.get("cache_entry")
            if not isinstance(entry, dict) or entry.get("key") != key or entry.get("pass") != pass_name:
                raise BundleError(f"cache entry '{path}' does not belong to key {key[:12]}…", path=path)
            if not intact(bundle, entry):
                raise BundleError(f"cache entry '{path}' has a manifest that was changed", path=path)
            model = bundle.load_model()
        except BundleError as exc:
            log.warning("Dropping a damaged pass-cache entry and recomputing: %s", exc.message)
            shutil.rmtree(path, ignore_errors=True)
            return None
        return bundle, entry, model

    def get(self, key: str, pass_name: str) -> PassOutput | None:
        """The cached result, or None when absent or when the entry fails verification (then it is removed)."""
        from slipstream.passes.base import PassOutput

        def intact(bundle: Bundle, entry: dict[str, Any]) -> bool:
            digest = _payload_digest(entry.get("resolved"), entry.get("warnings"), bundle.manifest.metrics)
            return bool(entry.get("payload_sha256") == digest)

        found = self._verified(key, pass_name, intact)
        if found is None:
            return None
        bundle, entry, model = found
        resolved, warnings = entry.get("resolved"), entry.get("warnings")
        return PassOutput(
            model=model,
            resolved=dict(resolved) if isinstance(resolved, dict) else {},
            metrics=dict(bundle.manifest.metrics),
            warnings=[str(w) for w in warnings] if isinstance(warnings, list) else [],
        )

    def put(self, key: str, pass_name: str, result: PassOutput, step: Step) -> None:
        inputs, outputs = graph_io_specs(result.model.graph)
        manifest = Manifest(
            name=f"cache-{key[:16]}",
            source=Source(framework="onnx"),
            inputs=inputs,
            outputs=outputs,
            resolved={
                "cache_entry": {
                    "key": key,
                    "pass": pass_name,
                    "resolved": result.resolved,
                    "warnings": list(result.warnings),
                    "payload_sha256": _payload_digest(result.resolved, list(result.warnings), result.metrics),
                }
            },
            metrics=dict(result.metrics),
        )
        try:
            write_bundle(self.entry_path(key), result.model, manifest, step=step, overwrite=True)
        except OSError as exc:  # a full or read-only cache must not fail the pass itself
            log.warning("Could not write pass-cache entry %s: %s", key[:12], exc)

    def get_bundle(self, key: str, pass_name: str) -> tuple[onnx.ModelProto, Manifest] | None:
        """A cached bundle-writing result (export, import): its model and manifest as first written, or None
        when absent or when the entry fails verification (then it is removed)."""

        def intact(bundle: Bundle, entry: dict[str, Any]) -> bool:
            return bool(entry.get("manifest_sha256") == _manifest_digest(_without_entry(bundle.manifest)))

        found = self._verified(key, pass_name, intact)
        if found is None:
            return None
        bundle, _, model = found
        return model, _without_entry(bundle.manifest)

    def put_bundle(self, key: str, pass_name: str, bundle: Bundle) -> None:
        """Keep ``bundle`` (lineage, parity proof and all) as the result of ``key``."""
        marker = {"key": key, "pass": pass_name, "manifest_sha256": _manifest_digest(bundle.manifest)}
        manifest = bundle.manifest.model_copy(update={"resolved": {**bundle.manifest.resolved, "cache_entry": marker}})
        try:
            write_bundle(self.entry_path(key), bundle.load_model(), manifest, overwrite=True)
        except OSError as exc:  # a full or read-only cache must not fail the step itself
            log.warning("Could not write pass-cache entry %s: %s", key[:12], exc)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
