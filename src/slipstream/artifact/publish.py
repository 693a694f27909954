"""Publishing a bundle into a served repository: copied whole, checked, then renamed into place.

A server that polls ``repo/<model>/`` may look at a version directory at any moment. Copying files
straight into ``repo/<model>/3/`` lets it see a manifest without its model; it refuses that version
and retries it with backoff, but the clean way is the one this module takes: copy into a hidden
sibling (``repo/<model>/.3.<random>.tmp``, which scans skip), fsync, and rename it to ``3`` in one
step, so the server sees either no version 3 or all of it. The copy is made from the bytes read and
checked against the source's manifest, so what is published is what was verified.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from slipstream.artifact.bundle import (
    MANIFEST_FILE,
    UNLISTED_ALLOWED,
    Bundle,
    fsync_dir,
    integrity_error,
    refuse_existing,
)
from slipstream.artifact.members import MemberError, open_bundle_dir, read_member


def publish_bundle(source: Bundle | str | os.PathLike[str], dest: str | os.PathLike[str]) -> Bundle:
    """Copy a verified bundle to ``dest`` atomically (e.g. ``repo/<model>/<version>``); ``dest`` must not exist.

    Returns the published bundle, loaded and verified from its new place.
    """
    bundle = source if isinstance(source, Bundle) else Bundle.load(source)
    target = Path(dest)
    refuse_existing(target, overwrite=False, what="a version")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with open_bundle_dir(bundle.path) as dir_fd:
            for name in [*bundle.manifest.files, MANIFEST_FILE, *sorted(UNLISTED_ALLOWED)]:
                try:
                    data = bundle.read_file(name) if name in bundle.manifest.files else read_member(dir_fd, name)
                except MemberError as problem:
                    if name in UNLISTED_ALLOWED and not problem.containment:
                        continue  # an optional signature that is not there
                    raise integrity_error(bundle.path, [problem]) from None
                with (tmp / name).open("wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
        fsync_dir(tmp)
        tmp.rename(target)  # refuses a non-empty directory that appeared meanwhile: never merges into one
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.load(target)
