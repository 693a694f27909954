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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import JsonValue, ValidationError

from slipstream.artifact.external import DATA_FILE, check_external_locations, inline_external_data
from slipstream.artifact.hashing import sha256_file, sha256_json
from slipstream.artifact.manifest import SCHEMA_VERSION, FileDigest, LineageEntry, Manifest, current_version
from slipstream.artifact.members import (
    MemberError,
    check_member,
    foreign_entries,
    name_problem,
    open_bundle_dir,
    read_member,
    read_verified,
)
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
EXTERNAL_DATA_FILE = DATA_FILE  # "model.onnx.data"
MANIFEST_FILE = "manifest.json"
# The OpenSSF model signature (slipstream.artifact.signing): made over every other file, manifest included.
SIGNATURE_FILE = "model.sig"
# Files a bundle may carry that the manifest cannot list (a signature is made over the manifest).
UNLISTED_ALLOWED = frozenset({"signature", "signature.json", SIGNATURE_FILE})
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


@dataclass(frozen=True)
class ModelBytes:
    """model.onnx and its external data as read (and hashed) once: what is checked is what is loaded."""

    model: bytes
    external_data: bytes | None = None

    def external_files(self) -> dict[str, bytes]:
        """File name -> content, for onnxruntime's in-memory external initializers."""
        return {EXTERNAL_DATA_FILE: self.external_data} if self.external_data is not None else {}


class Bundle:
    """A verified bundle on disk. Create one with :meth:`load` or :func:`write_bundle`."""

    def __init__(self, path: Path, manifest: Manifest, *, verify: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.verify = verify  # False only when the caller chose Bundle.load(verify=False)

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

    def read_file(self, name: str) -> bytes:
        """One listed file, read once through the bundle directory and checked against the manifest."""
        digest = self.manifest.files.get(name)
        if digest is None:
            raise IntegrityError(
                f"Bundle '{self.path}' has no file '{name}' in its manifest.",
                path=self.path,
                file=name,
                hint="List the bundle's files with `slipstream inspect`.",
            )
        with _bundle_dir(self.path) as dir_fd:
            try:
                return read_verified(
                    dir_fd, name, size_bytes=digest.size_bytes, sha256=digest.sha256 if self.verify else None
                )
            except MemberError as problem:
                raise integrity_error(self.path, [problem]) from None

    def read_model_bytes(self) -> ModelBytes:
        """model.onnx (and model.onnx.data) read once and verified; feed these bytes to onnx or onnxruntime.

        Refuses a model whose external data lives anywhere but the bundle's own listed side file.
        """
        return self._read_model()[0]

    def load_model(self, *, load_external_data: bool = True) -> onnx.ModelProto:
        """The model as an onnx proto, built from the verified bytes (external data filled in from them)."""
        data, model = self._read_model()
        if load_external_data and data.external_data is not None:
            inline_external_data(self.path, model, data.external_data)
        return model

    def _read_model(self) -> tuple[ModelBytes, onnx.ModelProto]:
        import onnx

        model = self.read_file(MODEL_FILE)
        external = self.read_file(EXTERNAL_DATA_FILE) if EXTERNAL_DATA_FILE in self.manifest.files else None
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(model)
        except Exception as exc:  # protobuf's DecodeError
            raise IntegrityError(
                f"{MODEL_FILE} in '{self.path}' is not an ONNX model ({type(exc).__name__}).",
                path=self.path,
                file=MODEL_FILE,
                hint="Rebuild the bundle from its source.",
            ) from exc
        check_external_locations(self.path, proto, has_data_file=external is not None)
        return ModelBytes(model, external), proto

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
        return cls(root, manifest, verify=verify)


def read_manifest(root: Path) -> Manifest:
    with _bundle_dir(root) as dir_fd:
        try:
            text = read_member(dir_fd, MANIFEST_FILE)
        except MemberError as problem:
            if problem.containment:
                raise integrity_error(root, [problem]) from None
            raise BundleNotFoundError(
                f"'{root}' is not a bundle: it has no {MANIFEST_FILE}.",
                path=root,
                hint="Create one with `slipstream convert MODEL -o BUNDLE`.",
            ) from None
    try:
        raw = json.loads(text.decode("utf-8"))
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
    """Check that every listed file is a regular file in the bundle with the recorded size and sha256,
    and that nothing else (no unlisted file, no symlink) is there; one error lists every problem."""
    problems: list[MemberError] = []
    with _bundle_dir(root) as dir_fd:
        for name, digest in sorted(manifest.files.items()):
            try:
                check_member(dir_fd, name, size_bytes=digest.size_bytes, sha256=digest.sha256)
            except MemberError as problem:
                problems.append(problem)
        if MODEL_FILE not in manifest.files:
            problems.append(MemberError(MODEL_FILE, f"the manifest does not list {MODEL_FILE}", containment=False))
        reported = {p.name for p in problems}
        for name, text in foreign_entries(dir_fd):
            if name not in reported:
                problems.append(MemberError(name, text, containment=True))
                reported.add(name)
        listed = set(manifest.files) | {MANIFEST_FILE} | UNLISTED_ALLOWED
        with os.scandir(dir_fd) as entries:
            unlisted = sorted(e.name for e in entries if e.name not in listed and e.name not in reported)
        problems += [MemberError(n, f"'{n}' is not listed in the manifest", containment=False) for n in unlisted]
    if problems:
        raise integrity_error(root, problems)


def integrity_error(root: Path, problems: list[MemberError]) -> IntegrityError:
    """One error for every problem found, naming the first file; the hint fits the kind of problem."""
    detail = "; ".join(p.text for p in problems)
    if any(p.containment for p in problems):
        hint = (
            "A bundle is a flat directory of regular files listed by plain name in its manifest: replace "
            "symlinks with the files themselves, remove entries that point elsewhere, or restore the bundle "
            "from a trusted copy (slipstream never writes symlinks or paths)."
        )
    else:
        hint = (
            "The bundle was changed after it was written (or is still being copied). Rebuild it from its "
            "source, or restore it from a trusted copy."
        )
    return IntegrityError(
        f"Bundle '{root}' failed its integrity check: {detail}.", path=root, file=problems[0].name, hint=hint
    )


@contextmanager
def _bundle_dir(root: Path) -> Iterator[int]:
    try:
        with open_bundle_dir(root) as dir_fd:
            yield dir_fd
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise BundleNotFoundError(
            f"No bundle directory at '{root}' ({exc.strerror}).",
            path=root,
            hint="Create one with `slipstream convert MODEL -o BUNDLE`.",
        ) from None


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


def fsync_dir(path: Path) -> None:
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
            if name in (MODEL_FILE, MANIFEST_FILE, EXTERNAL_DATA_FILE) or name_problem(name) is not None:
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
        fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(target, final)
