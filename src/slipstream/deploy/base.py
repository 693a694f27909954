"""What every export target shares: the source (one bundle or a served repository), the typed options, the
``Deployer`` protocol, and :func:`export`, which owns the mechanics so that a target only says what it cannot
express (``refusals``) and writes its files (``write``).

The mechanics are the point: the bundles are loaded and verified (every file's sha256) before any target sees
them; every refusal is collected and raised as one error before a byte is written; the target writes into a
hidden temporary sibling of the output, which is renamed into place only when complete, so an export that
crashes, is interrupted or raises leaves no half-written directory behind.
"""

from __future__ import annotations

import difflib
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol

from pydantic import Field, model_validator

from slipstream.artifact.bundle import MANIFEST_FILE, Bundle, fsync_dir, refuse_existing
from slipstream.errors import ConfigError, ExportRefusedError
from slipstream.frozen import Frozen

Architecture = Literal["x86_64", "aarch64"]
Accelerator = Literal["auto", "none", "tensorrt", "openvino"]

# platform.machine() spellings → the names container platforms and wheels use.
_MACHINE_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def host_architecture() -> str:
    """This machine's CPU architecture, in the spelling of ``Architecture``."""
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


@dataclass(frozen=True)
class SourceBundle:
    """One model version of the source: its served name and version, the verified bundle, and its directory."""

    name: str
    version: str
    bundle: Bundle
    path: Path


@dataclass(frozen=True)
class DeploySource:
    """What is exported: one bundle, or a repository laid out as ``slipstream serve`` reads it.

    The layout rules are serve/repository.py's ``Repository.discover``: a directory holding ``manifest.json``
    is one bundle, served under its manifest's name and version; otherwise every non-hidden ``<model>/<version>/``
    directory is one version (hidden ones, like a ``.3.tmp`` being published, are skipped).
    """

    path: Path
    bundles: tuple[SourceBundle, ...]
    repository: bool

    @classmethod
    def load(cls, path: Path) -> DeploySource:
        """Read and verify every bundle of the source; a damaged one fails here with its IntegrityError."""
        if (path / MANIFEST_FILE).is_file():
            bundle = Bundle.load(path)
            one = SourceBundle(bundle.manifest.name, bundle.manifest.version, bundle, path)
            return cls(path=path, bundles=(one,), repository=False)
        if not path.is_dir():
            raise ConfigError(
                f"Expected a bundle or a model repository directory at '{path}'; it does not exist.",
                field="source",
                hint="Pass a bundle from `slipstream convert`/`build`, or a directory laid out as <model>/<version>/.",
            )
        found: list[SourceBundle] = []
        for model_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for version_dir in sorted(v for v in model_dir.iterdir() if v.is_dir() and not v.name.startswith(".")):
                found.append(SourceBundle(model_dir.name, version_dir.name, Bundle.load(version_dir), version_dir))
        if not found:
            raise ConfigError(
                f"'{path}' is neither a bundle (no {MANIFEST_FILE}) nor a model repository (no <model>/<version>/).",
                field="source",
                hint="Pass a bundle directory, or a repository such as repo/digits/1/ holding bundles.",
            )
        return cls(path=path, bundles=tuple(found), repository=True)


class DeployOptions(Frozen):
    """How the exported service runs. Unset values come from what the bundle's build measured and tuned."""

    replicas: int = Field(default=1, ge=1, description="Fixed number of replicas (ignored when autoscaling is set).")
    min_replicas: int | None = Field(default=None, ge=0, description="Autoscaling lower bound; set with max_replicas.")
    max_replicas: int | None = Field(default=None, ge=1, description="Autoscaling upper bound; set with min_replicas.")
    cpus_per_replica: float | None = Field(
        default=None, gt=0, description="CPUs per replica; default: the bundle's tuned intra-op threads (else 1)."
    )
    memory_per_replica_mb: int | None = Field(
        default=None, ge=64, description="Memory per replica in MiB; default: the bundle's measured footprint."
    )
    image: str = Field(default="slipstream-serve:latest", description="Container image that runs `slipstream serve`.")
    base_image: str = Field(default="python:3.11-slim", description="Base image of the generated Dockerfile.")
    monitor_db: str | None = Field(
        default=None,
        description="Ray: the prediction log every replica writes: a postgresql:// URL (one fleet; the password "
        "from PGPASSWORD/PGPASSFILE on the nodes) or a file path (one SQLite file per replica); unset: no monitor.",
    )
    storage_uri: str | None = Field(
        default=None, description="Where KServe finds the bundle (s3://, gs://, pvc://...); required for kserve."
    )
    architecture: Architecture | None = Field(
        default=None, description="CPU architecture the export will run on; default: this machine's."
    )
    accelerator: Accelerator = Field(
        default="auto",
        description="Triton execution accelerator; 'auto' follows the bundle's build target (tensorrt, openvino).",
    )
    instances_per_replica: int = Field(default=1, ge=1, description="Model instances per replica (Triton).")
    batching: bool | None = Field(
        default=None,
        description="Server-side dynamic batching: True demands it (refused for a model that cannot batch), "
        "False turns it off, None batches whenever the model can.",
    )
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Largest batch the server forms; default: from the build's measurements."
    )
    max_queue_delay_us: int | None = Field(
        default=None, ge=0, description="Longest a request waits for a batch to fill, in µs; default: measured."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port the serving container listens on.")
    operator_set: str | None = Field(
        default=None, description="Edge: the named minimal onnxruntime operator set the model must fit."
    )
    parity_data: Path | None = Field(
        default=None, description="Edge: an .npz of real inputs (named as the model's) for the parity check."
    )
    wheel: Path | None = Field(
        default=None, description="Container: the slipstream wheel to install; default: built from the source tree."
    )
    trusted_key: Path | None = Field(
        default=None,
        description="Container and Ray: the PEM public key every bundle must be signed with (checked at export); "
        "the export carries it, and the server starts with --require-signature.",
    )
    overwrite: bool = Field(default=False, description="Replace an existing output directory.")

    @model_validator(mode="after")
    def _autoscaling_pair(self) -> DeployOptions:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas and max_replicas go together: set both for autoscaling, or neither")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def target_architecture(self) -> str:
        return self.architecture or host_architecture()


class ExportResult(Frozen):
    """What an export wrote, for the CLI and for callers that ship it."""

    target: str = Field(description="The deployer that wrote it.")
    out: Path = Field(description="The output directory, complete (it was renamed into place).")
    files: tuple[str, ...] = Field(description="Every file written, relative to out, sorted.")
    models: tuple[str, ...] = Field(description="Every exported model as 'name/version'.")
    duration_s: float = Field(ge=0, description="Wall time of the export, in seconds.")


class Deployer(Protocol):
    """One export target. Implementations are stateless: everything comes in through the arguments."""

    name: ClassVar[str]

    def refusals(self, source: DeploySource, options: DeployOptions) -> list[str]:
        """Every reason this target cannot express ``source`` with ``options``; empty when it can."""
        ...

    def write(self, source: DeploySource, options: DeployOptions, into: Path) -> list[Path]:
        """Write the export into the (empty, temporary) directory ``into``; return the files written."""
        ...


Progress = Callable[[str], None]


def _no_progress(_: str) -> None:
    return None


def find_deployer(deployers: Mapping[str, Deployer], to: str) -> Deployer:
    """The deployer called ``to``, or a ConfigError listing the known ones with a did-you-mean."""
    if to in deployers:
        return deployers[to]
    close = difflib.get_close_matches(to, list(deployers), n=1, cutoff=0.5)
    tip = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"Unknown export target '{to}'{tip}; expected one of {', '.join(sorted(deployers))}.",
        field="to",
        hint=f"slipstream export BUNDLE --to {close[0] if close else sorted(deployers)[0]} -o DIR",
    )


def export(
    source: Path,
    to: str,
    out: Path,
    options: DeployOptions | None = None,
    *,
    deployers: Mapping[str, Deployer] | None = None,
    progress: Progress = _no_progress,
) -> ExportResult:
    """Export the bundle or repository at ``source`` for the target ``to`` into the directory ``out``.

    Nothing is written when the source fails verification or the target refuses it; a failure while writing
    leaves no ``out`` (and an existing ``out`` is only replaced, whole, when ``options.overwrite``).
    """
    from slipstream.deploy import DEPLOYERS

    started = time.perf_counter()
    options = options or DeployOptions()
    deployer = find_deployer(DEPLOYERS if deployers is None else deployers, to)
    refuse_existing(out, overwrite=options.overwrite, what="an export")
    src, dst = source.resolve(), out.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise ConfigError(
            f"The export directory '{out}' overlaps the source '{source}'; replacing it would destroy the source.",
            field="out",
            hint="Write the export somewhere outside the bundle or repository.",
        )
    progress(f"verifying {source}")
    loaded = DeploySource.load(source)
    progress(f"verified {len(loaded.bundles)} bundle(s): " + ", ".join(f"{b.name}/{b.version}" for b in loaded.bundles))
    reasons = deployer.refusals(loaded, options)
    if reasons:
        raise ExportRefusedError(
            f"Cannot export '{source}' to {deployer.name}:" + "".join(f"\n  - {reason}" for reason in reasons),
            target=deployer.name,
            reasons=reasons,
            hint="Change the options named above, export another bundle, or choose another --to target.",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        progress(f"writing the {deployer.name} export")
        written = deployer.write(loaded, options, tmp)
        files = tuple(sorted(str(p.relative_to(tmp)) for p in written))
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is read by the tools and images that ship it
        _fsync_tree(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"wrote {len(files)} file(s) to {out}")
    return ExportResult(
        target=deployer.name,
        out=out,
        files=files,
        models=tuple(f"{b.name}/{b.version}" for b in loaded.bundles),
        duration_s=time.perf_counter() - started,
    )


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            with (Path(folder) / name).open("rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (overwrite was asked) is moved aside first, then removed."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    fsync_dir(out.parent)
