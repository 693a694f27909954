"""Importers turn a source model into a bundle. Framework importers load their framework lazily."""

from slipstream.importers.convert import convert
from slipstream.importers.onnx import import_onnx

__all__ = ["convert", "import_onnx"]
