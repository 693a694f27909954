"""Safe access to the files inside a bundle directory: flat names, regular files, no symlinks.

A bundle is a flat directory of regular files. Every read goes through a descriptor of the bundle
directory (``dir_fd``) and opens a member with ``O_NOFOLLOW``, so a member cannot be a symlink to a
file elsewhere, a manifest entry cannot name ``../../etc/passwd`` or ``/etc/passwd``, and a FIFO or a
device is refused before it is read. What is hashed and what is loaded are the same bytes: the loaders
read a member once, hash those bytes, and hand the same bytes on (:func:`read_verified`), so swapping a
file between a check and a load changes nothing that is used.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CHUNK = 1 << 20
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; regular files ignore it.
_MEMBER_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class MemberError(Exception):
    """A member cannot be used; ``text`` says why in one clause. Turned into an IntegrityError by callers."""

    def __init__(self, name: str, text: str, *, containment: bool) -> None:
        super().__init__(text)
        self.name = name
        self.text = text
        self.containment = containment  # True: a symlink, a path outside the bundle, not a regular file


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a member of a bundle, or None. Members are plain names in the bundle directory."""
    if not name or name in (".", "..") or "\x00" in name:
        return f"the manifest lists the file name {name!r}, which is not a file name"
    if "/" in name or "\\" in name:  # covers absolute paths and "../x" alike
        return (
            f"the manifest lists '{name}', a path: bundle files are plain names inside the bundle "
            "directory (no absolute paths, no '..', no sub-directories)"
        )
    return None


@contextmanager
def open_bundle_dir(root: Path) -> Iterator[int]:
    """A descriptor of the bundle directory; the root itself may be reached through a symlink."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def open_member(dir_fd: int, name: str) -> Iterator[tuple[int, os.stat_result]]:
    """Open one member for reading, refusing anything that is not a regular file right in the directory."""
    problem = name_problem(name)
    if problem is not None:
        raise MemberError(name, problem, containment=True)
    try:
        fd = os.open(name, _MEMBER_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise MemberError(name, f"'{name}' is missing", containment=False) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MemberError(
                name, f"'{name}' is a symbolic link (a bundle holds regular files only)", containment=True
            ) from None
        raise MemberError(name, f"'{name}' cannot be opened ({exc.strerror})", containment=False) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MemberError(name, f"'{name}' is not a regular file", containment=True)
        yield fd, info
    finally:
        os.close(fd)


def _size_problem(name: str, size: int, size_bytes: int) -> MemberError:
    return MemberError(name, f"'{name}' has {size} bytes, the manifest records {size_bytes}", containment=False)


def _digest_problem(name: str, actual: str, sha256: str) -> MemberError:
    text = f"'{name}' has sha256 {actual[:12]}…, the manifest records {sha256[:12]}…"
    return MemberError(name, text, containment=False)


def check_member(dir_fd: int, name: str, *, size_bytes: int, sha256: str) -> None:
    """Check one member's size (before reading: a copy in progress fails cheaply), then stream its sha256."""
    with open_member(dir_fd, name) as (fd, info):
        if info.st_size != size_bytes:
            raise _size_problem(name, info.st_size, size_bytes)
        h = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
            size += len(chunk)
    if size != size_bytes:
        raise _size_problem(name, size, size_bytes)
    if h.hexdigest() != sha256:
        raise _digest_problem(name, h.hexdigest(), sha256)


def read_member(dir_fd: int, name: str) -> bytes:
    """The whole content of one member, read from one descriptor."""
    with open_member(dir_fd, name) as (fd, info):
        parts: list[bytes] = []
        remaining = info.st_size
        while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 26))):
            parts.append(chunk)
            remaining -= len(chunk)
        # A file that grew after fstat keeps its extra bytes out of what we return; the digest check catches it.
        return b"".join(parts)


def read_verified(dir_fd: int, name: str, *, size_bytes: int, sha256: str | None) -> bytes:
    """Read a member once and check those very bytes against the manifest's size and digest."""
    data = read_member(dir_fd, name)
    if len(data) != size_bytes:
        raise _size_problem(name, len(data), size_bytes)
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise _digest_problem(name, actual, sha256)
    return data


def foreign_entries(dir_fd: int) -> list[tuple[str, str]]:
    """Entries that cannot be in a bundle whatever the manifest says: symlinks and anything not a regular file."""
    found: list[tuple[str, str]] = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_symlink():
                target = os.readlink(entry.name, dir_fd=dir_fd)
                found.append((entry.name, f"'{entry.name}' is a symbolic link (to '{target}')"))
            elif not entry.is_file(follow_symlinks=False):
                found.append((entry.name, f"'{entry.name}' is not a regular file"))
    return sorted(found)
