"""Run bundles: onnxruntime sessions or OpenVINO compiled models built from a bundle and a target profile."""

from slipstream.runtime.base import EngineBase, EngineInfo
from slipstream.runtime.choice import EngineChoice, engine_choice
from slipstream.runtime.engine import Engine
from slipstream.runtime.open import open_engine
from slipstream.runtime.targets import Target, target

__all__ = ["Engine", "EngineBase", "EngineChoice", "EngineInfo", "Target", "engine_choice", "open_engine", "target"]
