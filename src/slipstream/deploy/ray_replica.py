"""A Ray Serve replica: verify the exported bundles, then serve slipstream's own ASGI app through ``serve.ingress``.

Imported only where the application runs (every node of the Ray cluster needs the ``ray`` extra); the
exporter (slipstream.deploy.ray) does not import Ray.

The app is late-bound (``serve.ingress()`` with ``__serve_build_asgi_app__``): Ray builds it inside the
replica after the constructor has verified the bundles, then runs its ASGI lifespan startup, where the
models load, exactly as under uvicorn. A replica whose bundles fail verification, or differ from those
exported, raises in its constructor and never receives traffic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slipstream.deploy.base import DeploySource
from slipstream.deploy.ray import DEPLOYMENT_NAME, RayAppArgs, anchored
from slipstream.errors import BundleError, MissingDependencyError, ServingError
from slipstream.monitor.location import parse_location
from slipstream.serve.app import SlipstreamApp, create_app
from slipstream.serve.guard import ADMIN_KEYS_ENV, API_KEYS_ENV, read_keys
from slipstream.serve.settings import ServeSettings

try:
    from ray import serve
except ImportError as exc:  # a node of the cluster without the extra: say which one to install
    raise MissingDependencyError("ray", extra="ray", feature="A Ray Serve replica of slipstream") from exc


def replica_settings(args: RayAppArgs, environ: Mapping[str, str], replica: str) -> ServeSettings:
    """The exported settings plus what only the node knows: API keys from its environment, the monitor's log."""
    fields: dict[str, Any] = args.settings.model_dump(exclude_unset=True)
    guard = dict(fields.get("guard", {}))
    guard["api_key_hashes"] = read_keys(None, environ, API_KEYS_ENV)
    guard["admin_key_hashes"] = read_keys(None, environ, ADMIN_KEYS_ENV)
    fields["guard"] = guard
    if args.monitor_db is not None:
        monitor = dict(fields.get("monitor", {}))
        monitor["store"] = {**monitor.get("store", {}), "path": monitor_path(args.monitor_db, replica)}
        fields["monitor"] = monitor
    return ServeSettings.model_validate(fields)


def monitor_path(monitor_db: str, replica: str) -> Path | str:
    """Where one replica logs: the fleet's PostgreSQL database itself, or a SQLite file of its own.

    Every replica writes the same ``postgresql://`` store, so they are one fleet: feedback to any replica joins
    any prediction, and one elected replica evaluates (slipstream.monitor.fleet). A SQLite file is one per
    replica (``<path>.<replica>.sqlite``): replicas on one node would otherwise contend for one writer lock.
    Any other URL, or a URL with a password in it, is refused here as by ``serve --monitor-db``.
    """
    location = parse_location(monitor_db, field="monitor_db")
    if isinstance(location, str):
        return location
    return location.with_name(f"{location.stem}.{replica}.sqlite")


def check_models(root: Path, expected: RayAppArgs) -> None:
    """Verify every bundle under ``root`` (each file's sha256) and that they are exactly the exported ones."""
    source = DeploySource.load(root)
    found = {(b.name, b.version, b.bundle.model_sha256) for b in source.bundles}
    wanted = {(m.name, m.version, m.model_sha256) for m in expected.models}
    if found != wanted:

        def show(items: set[tuple[str, str, str]]) -> str:
            return ", ".join(f"{n}/{v} ({sha[:12]})" for n, v, sha in sorted(items)) or "nothing"

        raise BundleError(
            f"The replica expected the exported models {show(wanted - found)} at '{root}'; "
            f"it found {show(found - wanted)} instead.",
            path=root,
            hint="Re-export with `slipstream export --to ray` rather than editing the application's model files.",
        )


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SlipstreamReplica:
    """One replica: the bundles verified at construction, the ASGI app built and started by Ray."""

    def __init__(self, root: str, args: dict[str, Any]) -> None:
        self.args = RayAppArgs.model_validate(args)
        self.root = Path(root)
        check_models(self.root, self.args)
        replica = serve.get_replica_context().replica_id.unique_id
        self.settings = replica_settings(self.args, os.environ, replica)
        self.slipstream: SlipstreamApp | None = None  # not `app`: the ingress wrapper owns that name

    def __serve_build_asgi_app__(self) -> SlipstreamApp:
        self.slipstream = create_app(self.root, self.settings)
        return self.slipstream

    def check_health(self) -> None:
        """Ray's periodic health check: a replica with no model READY is restarted by the controller."""
        app = self.slipstream
        if app is None or app.draining:
            return
        if not any(e.state == "READY" for versions in app.repository.models.values() for e in versions.values()):
            raise ServingError("No model is READY in this replica.", hint="See the replica's log for the load error.")


def application(here: Path, args: Mapping[str, Any]) -> Any:
    """The Serve application of an export: ``args`` from serve_config.yaml, paths relative to ``here``."""
    parsed = anchored(RayAppArgs.model_validate(dict(args)), here)
    root = Path(parsed.root)
    root = root if root.is_absolute() else here / root
    deployment: Any = SlipstreamReplica  # a serve.Deployment; Ray's decorators are untyped for mypy
    return deployment.bind(str(root), parsed.model_dump(mode="json", exclude_unset=True))
