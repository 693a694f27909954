"""The embedded default job (`slipstream demo`) and the small models it and the tests use."""

from slipstream.demo.basic import build_mlp
from slipstream.demo.main import run_demo

__all__ = ["build_mlp", "run_demo"]
