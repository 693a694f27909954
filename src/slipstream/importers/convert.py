"""One entry point that picks the importer for a source model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from slipstream.artifact.bundle import Bundle
from slipstream.errors import ConversionError
from slipstream.importers.onnx import import_onnx

FrameworkChoice = Literal["auto", "onnx"]

_SUFFIXES: dict[str, str] = {".onnx": "onnx"}


def detect_framework(path: Path) -> str:
    framework = _SUFFIXES.get(path.suffix.lower())
    if framework is None:
        raise ConversionError(
            f"Cannot tell the framework of '{path}' from its suffix '{path.suffix}'; "
            f"this version converts {', '.join(sorted(_SUFFIXES))} files.",
            source=str(path),
            hint="Export the model to ONNX first, or pass --framework.",
        )
    return framework


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    framework: FrameworkChoice = "auto",
    name: str | None = None,
    version: str = "1",
    overwrite: bool = False,
) -> Bundle:
    """Convert a source model into a verified bundle at ``output``."""
    path = Path(source)
    chosen = detect_framework(path) if framework == "auto" else framework
    if chosen == "onnx":
        return import_onnx(path, output, name=name, version=version, overwrite=overwrite)
    raise ConversionError(f"Framework {chosen!r} is not supported.", source=str(path))
