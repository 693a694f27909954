"""The pinned runtime lock of a container: slipstream's serving and monitoring closure, at this environment's versions.

The closure is walked from slipstream's own metadata (its core requirements plus the ``serve`` and
``monitor`` extras), with environment markers evaluated here, and each package pinned at the version
installed here: the image runs what was tested in this environment, and nothing else (no torch, no
TensorFlow: no requirement of those extras leads to them).
"""

from __future__ import annotations

import re
from importlib import metadata

from slipstream.errors import MissingDependencyError

SERVE_EXTRAS = ("serve", "monitor")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_lock(extras: tuple[str, ...] = SERVE_EXTRAS) -> dict[str, str]:
    """Canonical package name → installed version, for everything ``slipstream[extras]`` needs, slipstream excluded."""
    try:
        from packaging.requirements import Requirement
    except ImportError as exc:
        raise MissingDependencyError("packaging", extra="serve", feature="Writing a container's lock") from exc
    pinned: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [("slipstream", frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        dist = metadata.distribution(name)
        if name != "slipstream":
            pinned[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            environments = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in environments):
                continue
            child = _canonical(req.name)
            if child == "slipstream":  # a self-referencing extra (slipstream[torch] inside [transformers])
                todo.append(("slipstream", frozenset(req.extras)))
                continue
            todo.append((child, frozenset(req.extras)))
    return dict(sorted(pinned.items()))


def lock_text(pins: dict[str, str], header: str) -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*lines, *(f"{name}=={version}" for name, version in pins.items())]) + "\n"
