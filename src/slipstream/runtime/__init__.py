"""Run bundles: onnxruntime sessions built from a bundle and a target profile."""

from slipstream.runtime.engine import Engine
from slipstream.runtime.targets import Target, target

__all__ = ["Engine", "Target", "target"]
