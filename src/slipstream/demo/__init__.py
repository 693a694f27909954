"""The embedded default job (`slipstream demo`) and the small models it and the tests use."""

from slipstream.demo.basic import build_mlp
from slipstream.demo.main import run_demo
from slipstream.demo.result import DemoResult

__all__ = ["DemoResult", "build_mlp", "run_demo"]
