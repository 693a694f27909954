"""Copying a verified bundle into an export, so that the copy stays a bundle ``Bundle.load`` can verify."""

from __future__ import annotations

from pathlib import Path

from slipstream.artifact.bundle import MANIFEST_FILE, SIGNATURE_FILE, Bundle
from slipstream.artifact.members import MemberError, open_bundle_dir, read_member


def copy_bundle(bundle: Bundle, dest: Path) -> list[Path]:
    """Every listed file plus the manifest, through the verified reads (what is copied is what was checked), and
    the bundle's signature (model.sig) when it has one: a signed bundle stays signed."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(bundle.manifest.files):
        target = dest / name
        target.write_bytes(bundle.read_file(name))
        written.append(target)
    manifest = dest / MANIFEST_FILE
    manifest.write_bytes((bundle.path / MANIFEST_FILE).read_bytes())
    written.append(manifest)
    with open_bundle_dir(bundle.path) as dir_fd:
        try:
            signature = read_member(dir_fd, SIGNATURE_FILE)
        except MemberError:
            return written  # unsigned (a symlinked signature was refused when the bundle loaded)
    (dest / SIGNATURE_FILE).write_bytes(signature)
    written.append(dest / SIGNATURE_FILE)
    return written
