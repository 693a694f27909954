"""The Ray Serve target: an application directory that a Ray cluster runs with ``serve run serve_config.yaml``.

What is written (``slipstream export BUNDLE --to ray -o DIR``)::

    DIR/serve_config.yaml    Ray's own config schema (ServeDeploySchema): replicas or autoscaling, CPUs
    DIR/slipstream_app.py    the application builder that config's import_path names
    DIR/model/               the verified bundle (or DIR/repository/<model>/<version>/ for a repository)
    DIR/trusted_key.pem      with --trusted-key: every replica serves with require_signature and this key

Each replica is slipstream's own ASGI app (``slipstream.serve.app.create_app``) behind ``serve.ingress``
(slipstream.deploy.ray_replica), so the protocol, the guard, batching and metrics are those of
``slipstream serve``; Ray's proxy only forwards. This module does not import Ray: exporting needs only
slipstream, and the ``ray`` extra is needed where the application runs.

The bundle travels with the application: ``serve run serve_config.yaml --working-dir DIR`` uploads DIR to
the cluster (Ray caps such an upload at its gRPC message size, 512 MiB), or, with ``storage_uri``, the
config points every node at a zip of DIR stored there.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field

from slipstream.deploy.base import DeployOptions, DeploySource
from slipstream.deploy.resources import batchable, cpus_for
from slipstream.deploy.signed import TRUSTED_KEY_FILE, copy_trusted_key, signature_refusals
from slipstream.errors import ConfigError
from slipstream.frozen import Frozen
from slipstream.monitor.location import parse_location
from slipstream.serve.settings import ServeSettings

CONFIG_FILE = "serve_config.yaml"
MODULE_FILE = "slipstream_app.py"
APP_NAME = "slipstream"
DEPLOYMENT_NAME = "slipstream"
# Ray uploads a local working_dir through one gRPC message (ray_constants.GRPC_CPP_MAX_MESSAGE_SIZE).
UPLOAD_LIMIT_BYTES = 512 * 2**20
# Remote working_dir URIs Ray can fetch (ray._private.runtime_env.protocol): a zip of the export directory.
REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "azure://", "abfss://", "file://")
# Requests Ray's proxy keeps in flight per replica, as a multiple of the batch size: a replica fills its
# next batch while the current one runs (Ray's default of 5 would cap every batch at 5 rows).
ONGOING_PER_BATCH = 2


class ExportedModel(Frozen):
    """One model version the application was exported with; a replica refuses to serve anything else."""

    name: str = Field(description="The served model name.")
    version: str = Field(description="The served version.")
    model_sha256: str = Field(description="The bundle's model digest (model.onnx plus external data).")


class RayAppArgs(Frozen):
    """The ``args`` of the application in serve_config.yaml: what each replica is built from."""

    root: str = Field(description="The bundle or repository, relative to slipstream_app.py's directory (or absolute).")
    models: tuple[ExportedModel, ...] = Field(min_length=1, description="Every model version the export holds.")
    settings: ServeSettings = Field(
        default_factory=ServeSettings,
        description="The ServeSettings of every replica (only the fields set at export; API keys are never here: "
        "replicas read $SLIPSTREAM_API_KEYS / $SLIPSTREAM_ADMIN_KEYS from their environment).",
    )
    monitor_db: str | None = Field(
        default=None,
        description="Monitoring: a postgresql:// URL that every replica writes (one fleet: shared feedback join, "
        "one elected evaluator, one webhook per alert; password from PGPASSWORD/PGPASSFILE on the nodes), or a "
        "file path (each replica then writes its own <path>.<replica>.sqlite beside it).",
    )


class RayDeployer:
    """``--to ray``: a Ray Serve application running slipstream's ASGI app in every replica."""

    name: ClassVar[str] = "ray"

    def refusals(self, source: DeploySource, options: DeployOptions) -> list[str]:
        reasons = signature_refusals(source, options)
        if options.monitor_db is not None:
            try:
                parse_location(options.monitor_db, field="monitor_db")
            except ConfigError as exc:
                reasons.append(exc.message)
        uri = options.storage_uri
        if uri is not None and not (
            uri.startswith("local://") or (uri.startswith(REMOTE_SCHEMES) and uri.endswith(".zip"))
        ):
            schemes = ", ".join(s.removesuffix("://") for s in REMOTE_SCHEMES)
            reasons.append(
                f"storage_uri must be a zip of the export directory at a URI Ray fetches ({schemes}; ending in "
                f".zip) or a local:// directory present on every node; got '{uri}'"
            )
        for b in source.bundles:
            if options.batching and not batchable(b.bundle.manifest):
                reasons.append(
                    f"model '{b.name}' cannot batch (batching needs one shared symbolic first axis on every input "
                    "and output); export without --batching (slipstream then serves it one request at a time)"
                )
        size = sum(b.bundle.size_bytes for b in source.bundles)
        if uri is None and size > UPLOAD_LIMIT_BYTES:
            reasons.append(
                f"the bundles hold {size / 2**20:.0f} MiB, over the {UPLOAD_LIMIT_BYTES // 2**20} MiB Ray uploads as "
                "a working_dir; give storage_uri (a zip of the export directory) instead"
            )
        return reasons

    def write(self, source: DeploySource, options: DeployOptions, into: Path) -> list[Path]:
        written: list[Path] = []
        root = "repository" if source.repository else "model"
        for b in source.bundles:
            dest = into / root / b.name / b.version if source.repository else into / root
            shutil.copytree(b.path, dest)
            written += [p for p in dest.rglob("*") if p.is_file()]
        args = app_args(source, options, root=root, monitor_db=options.monitor_db)
        config = serve_config(source, options, args)
        (into / CONFIG_FILE).write_text(_HEADER + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        (into / MODULE_FILE).write_text(_MODULE, encoding="utf-8")
        return [*written, *copy_trusted_key(options, into), into / CONFIG_FILE, into / MODULE_FILE]


def app_args(source: DeploySource, options: DeployOptions, *, root: str, monitor_db: str | None = None) -> RayAppArgs:
    """The replicas' arguments: the models to expect and the serving settings taken from ``options``.

    Batching is slipstream's own (a batch flushes once every in-flight request has joined), with the sizes
    given in ``options``, else ``slipstream serve``'s defaults. The replica sits behind Ray's proxy, which a
    cluster exposes, so the settings claim a public address: the guard then refuses to start without API keys
    unless ``guard.allow_anonymous`` is set in the config. Intra-op threads stay unset, so each bundle's tuned
    count applies as under ``slipstream serve``.
    """
    batching: dict[str, Any] = {}
    if options.batching is False:
        batching["max_batch_size"] = 1
    elif options.max_batch_size is not None:
        batching["max_batch_size"] = options.max_batch_size
    if options.max_queue_delay_us is not None:
        batching["max_queue_delay_ms"] = options.max_queue_delay_us / 1000
    fields: dict[str, Any] = {"host": "0.0.0.0", "batching": batching}
    if options.trusted_key is not None:  # relative to the application's directory: see anchored()
        fields["signing"] = {"require_signature": True, "trusted_key": TRUSTED_KEY_FILE}
    settings = ServeSettings.model_validate(fields)
    models = tuple(
        ExportedModel(name=b.name, version=b.version, model_sha256=b.bundle.model_sha256) for b in source.bundles
    )
    return RayAppArgs(root=root, models=models, settings=settings, monitor_db=monitor_db)


def anchored(args: RayAppArgs, here: Path) -> RayAppArgs:
    """``args`` with a relative trusted key resolved against the application's directory ``here`` on the node."""
    signing = args.settings.signing
    if signing.trusted_key is None or signing.trusted_key.is_absolute():
        return args
    resolved = signing.model_copy(update={"trusted_key": here / signing.trusted_key})
    return args.model_copy(update={"settings": args.settings.model_copy(update={"signing": resolved})})


def serve_config(source: DeploySource, options: DeployOptions, args: RayAppArgs) -> dict[str, Any]:
    """The Serve config (Ray's ServeDeploySchema, as plain data): one application with one deployment."""
    cpus = max(cpus_for(b.bundle, options.cpus_per_replica) for b in source.bundles)
    actor: dict[str, Any] = {"num_cpus": cpus}
    if options.memory_per_replica_mb is not None:
        actor["memory"] = options.memory_per_replica_mb * 2**20
    batch = args.settings.batching.max_batch_size
    deployment: dict[str, Any] = {"name": DEPLOYMENT_NAME}
    if options.autoscaling:
        deployment["autoscaling_config"] = {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": batch,
        }
    else:
        deployment["num_replicas"] = options.replicas
    deployment["max_ongoing_requests"] = max(ONGOING_PER_BATCH * batch, 8)
    deployment["ray_actor_options"] = actor
    application: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": f"{Path(MODULE_FILE).stem}:app",
        "args": args.model_dump(mode="json", exclude_unset=True),
        "deployments": [deployment],
    }
    if options.storage_uri is not None:
        application["runtime_env"] = {"working_dir": options.storage_uri}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": options.port},  # a cluster's proxy listens on all
        "applications": [application],
    }


_HEADER = """\
# Ray Serve application written by `slipstream export --to ray`.
# Run it from this directory:  serve run serve_config.yaml --working-dir .
# (or `serve deploy` with runtime_env.working_dir pointing at a zip of this directory).
# Every replica verifies the bundle before it serves; API keys come from $SLIPSTREAM_API_KEYS on the nodes.
"""

_MODULE = '''\
"""The application builder serve_config.yaml names; written by `slipstream export --to ray`.

Ray calls ``app(args)`` with the config's ``args``. The bundle lies beside this file, wherever Ray unpacked
the application's working_dir on the node.
"""

from pathlib import Path
from typing import Any

from slipstream.deploy.ray_replica import application

HERE = Path(__file__).resolve().parent


def app(args: dict[str, Any]) -> Any:
    return application(HERE, args)
'''
