"""Copying a verified bundle into an export, so that the copy stays a bundle ``Bundle.load`` can verify."""

from __future__ import annotations

from pathlib import Path

from slipstream.artifact.bundle import MANIFEST_FILE, Bundle


def copy_bundle(bundle: Bundle, dest: Path) -> list[Path]:
    """Every listed file plus the manifest, through the verified reads (what is copied is what was checked)."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(bundle.manifest.files):
        target = dest / name
        target.write_bytes(bundle.read_file(name))
        written.append(target)
    manifest = dest / MANIFEST_FILE
    manifest.write_bytes((bundle.path / MANIFEST_FILE).read_bytes())
    written.append(manifest)
    return written
