"""Helpers for running passes in tests without turning their PassWarnings into errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from slipstream.artifact import Bundle
from slipstream.passes import PassCache, PassRun, PassWarning, load_pass, lookup
from slipstream.runtime import Engine


def run_pass(
    bundle: Bundle, name: str, out: Path, options: dict[str, Any] | None = None, **kw: Any
) -> tuple[PassRun, list[str]]:
    """Run one pass; return the run and the texts of the PassWarnings it raised."""
    instance = load_pass(lookup(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PassWarning)
        run = instance.run(bundle, out, instance.make_config(options or {}), **kw)
    return run, [str(w.message) for w in caught if issubclass(w.category, PassWarning)]


def accuracy(bundle: Bundle, x: np.ndarray, y: np.ndarray) -> float:
    engine = Engine(bundle)
    logits = engine.run({bundle.manifest.inputs[0].name: x})[bundle.manifest.outputs[0].name]
    return float((np.argmax(logits, axis=1) == y).mean())


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


__all__ = ["PassCache", "accuracy", "run_pass", "tree_bytes"]
