"""The bundle: a directory with model.onnx, manifest.json and optional side files.

Writes are atomic: everything goes to a temporary sibling directory which is renamed into place
only once complete, so a crash mid-write leaves either the old bundle or nothing, never half of one.
Loading verifies the schema and the sha256 of every file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import JsonValue, ValidationError

from slipstream.artifact.hashing import sha256_file, sha256_json
from slipstream.artifact.manifest import SCHEMA_VERSION, FileDigest, LineageEntry, Manifest, current_version
from slipstream.errors import (
    BundleError,
    BundleExistsError,
    BundleNotFoundError,
    IntegrityError,
    SchemaError,
    validation_problems,
)

if TYPE_CHECKING:
    import onnx

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
# Files a bundle may carry that the manifest cannot list (a signature is made over the manifest).
UNLISTED_ALLOWED = frozenset({"signature", "signature.json"})
# protobuf cannot serialize a message of 2 GiB or more; switch to external data well below that.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


@dataclass(frozen=True)
class Step:
    """The lineage step that produces a bundle; the writer fills in the output digest and time."""

    name: str
    config: dict[str, JsonValue] = field(default_factory=dict)
    duration_s: float = 0.0
    input_sha256: str | None = None


def model_digest(files: Mapping[str, FileDigest]) -> str:
    """The digest that identifies a bundle's model: model.onnx plus its external data, if any."""
    model = files[MODEL_FILE].sha256
    if EXTERNAL_DATA_FILE not in files:
        return model
    return sha256_json([model, files[EXTERNAL_DATA_FILE].sha256])


class Bundle:
    """A verified bundle on disk. Create one with :meth:`load` or :func:`write_bundle`."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, name={self.manifest.name!r}, version={self.manifest.version!r})"

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def model_sha256(self) -> str:
        return model_digest(self.manifest.files)

    @property
    def size_bytes(self) -> int:
        return sum(d.size_bytes for d in self.manifest.files.values())

    def load_model(self, *, load_external_data: bool = True) -> onnx.ModelProto:
        import onnx

        return onnx.load(str(self.model_path), load_external_data=load_external_data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
        """Read a bundle; with ``verify`` (the default) every file's size and sha256 is checked."""
        root = Path(path)
        if not root.exists():
            raise BundleNotFoundError(
                f"No bundle at '{root}': the path does not exist.",
                path=root,
                hint="Create one with `slipstream convert MODEL -o BUNDLE`.",
            )
        if not root.is_dir():
            raise BundleError(
                f"Expected a bundle directory at '{root}', got a file.",
                path=root,
                hint="For a model file, make a bundle first: `slipstream convert MODEL -o BUNDLE`.",
            )
        manifest = read_manifest(root)
        if verify:
            verify_files(root, manifest)
        return cls(root, manifest)


def read_manifest(root: Path) -> Manifest:
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleNotFoundError(
            f"'{root}' is not a bundle: it has no {MANIFEST_FILE}.",
            path=root,
            hint="Create one with `slipstream convert MODEL -o BUNDLE`.",
        )
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(
            f"{MANIFEST_FILE} in '{root}' is not valid JSON ({exc}).",
            path=root,
            file=MANIFEST_FILE,
            hint="The file was damaged or edited by hand; rebuild the bundle from its source.",
        ) from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SchemaError(
            f"Bundle '{root}' has manifest schema version {version}; this slipstream reads up to {SCHEMA_VERSION}.",
            path=root,
            hint="Upgrade slipstream to read it.",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise SchemaError(
            f"{MANIFEST_FILE} in '{root}' does not match schema version {SCHEMA_VERSION}: {problems}.",
            path=root,
            hint="Rebuild the bundle from its source with this slipstream.",
        ) from exc


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check every listed file's size and sha256 and refuse unlisted files; one error lists all."""
    problems: list[tuple[str, str]] = []
    for name, digest in sorted(manifest.files.items()):
        fpath = root / name
        if not fpath.is_file():
            problems.append((name, f"'{name}' is missing"))
            continue
        size = fpath.stat().st_size
        if size != digest.size_bytes:
            problems.append((name, f"'{name}' has {size} bytes, the manifest records {digest.size_bytes}"))
            continue
        actual = sha256_file(fpath)
        if actual != digest.sha256:
            problems.append((name, f"'{name}' has sha256 {actual[:12]}…, the manifest records {digest.sha256[:12]}…"))
    if MODEL_FILE not in manifest.files:
        problems.append((MODEL_FILE, f"the manifest does not list {MODEL_FILE}"))
    listed = set(manifest.files) | {MANIFEST_FILE} | UNLISTED_ALLOWED
    for entry in sorted(p.name for p in root.iterdir()):
        if entry not in listed:
            problems.append((entry, f"'{entry}' is not listed in the manifest"))
    if problems:
        detail = "; ".join(text for _, text in problems)
        raise IntegrityError(
            f"Bundle '{root}' failed its integrity check: {detail}.",
            path=root,
            file=problems[0][0],
            hint="The bundle was changed after it was written. Rebuild it from its source, "
            "or restore it from a trusted copy.",
        )


def refuse_existing(target: Path, *, overwrite: bool, what: str = "a bundle") -> None:
    """Refuse to replace an existing output unless asked: checked before any work starts."""
    if target.exists() and not overwrite:
        raise BundleExistsError(
            f"Refusing to write {what} to '{target}': it already exists.",
            path=target,
            hint="Choose another output path, or pass --overwrite (overwrite=True) to replace it.",
        )


def _save_model(model: onnx.ModelProto, directory: Path, threshold_bytes: int) -> None:
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes >= threshold_bytes:
        # Saving with external data rewrites the tensors in place; work on a copy of the caller's model.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(
            copy,
            str(directory / MODEL_FILE),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(directory / MODEL_FILE))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(
    dest: str | os.PathLike[str],
    model: onnx.ModelProto,
    manifest: Manifest,
    *,
    step: Step | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Bundle:
    """Write ``model`` and ``manifest`` atomically to ``dest`` and return the loaded bundle.

    The writer sets ``created_at``, ``slipstream_version`` and ``files``, and appends ``step`` (if
    given) to the lineage with the digest of the model it wrote. ``model`` is not modified.
    """
    target = Path(dest)
    refuse_existing(target, overwrite=overwrite)
    if target.exists() and not target.is_dir():
        raise BundleExistsError(
            f"Cannot write a bundle to '{target}': a file is in the way.", path=target, hint="Remove it."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _save_model(model, tmp, external_data_threshold_bytes)
        for name, data in (extra_files or {}).items():
            if name in (MODEL_FILE, MANIFEST_FILE, EXTERNAL_DATA_FILE) or "/" in name:
                raise BundleError(f"Extra file name {name!r} is reserved or not flat.", path=target)
            (tmp / name).write_bytes(data)
        files = {p.name: FileDigest(sha256=sha256_file(p), size_bytes=p.stat().st_size) for p in sorted(tmp.iterdir())}
        now = datetime.now(UTC)
        lineage = manifest.lineage
        if step is not None:
            entry = LineageEntry(
                step=step.name,
                config=step.config,
                duration_s=step.duration_s,
                input_sha256=step.input_sha256,
                output_sha256=model_digest(files),
                at=now,
            )
            lineage = (*lineage, entry)
        final = manifest.model_copy(
            update={
                "created_at": now,
                "slipstream_version": current_version(),
                "files": files,
                "lineage": lineage,
                "schema_version": SCHEMA_VERSION,
            }
        )
        # Round-trip through validation so that a bad update cannot produce an unreadable bundle.
        final = Manifest.model_validate(final.model_dump())
        (tmp / MANIFEST_FILE).write_text(final.model_dump_json(indent=2) + "\n", encoding="utf-8")
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(target, final)
