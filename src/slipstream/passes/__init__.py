"""Optimization and compression passes: one Pass shape for ONNX passes, torch passes and export, run by one
runner (cache, timing, one typed lineage entry each)."""

from slipstream.passes.base import OnnxPass, Pass, PassConfig, PassContext, PassOutput, PassRun, PassWarning
from slipstream.passes.cache import PassCache
from slipstream.passes.catalogue import CATALOGUE, PassSpec, check_order, known_names, load_pass, lookup
from slipstream.passes.recipe import ProgressEvent, optimize, parse_pass_ref, plan
from slipstream.passes.runner import ChainRun, PassRunner
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_base import TorchContext, TorchPass
from slipstream.passes.torch_model import TorchData, TorchModel, TorchStep
from slipstream.passes.torch_recipe import optimize_torch

__all__ = [
    "CATALOGUE",
    "ChainRun",
    "OnnxPass",
    "Pass",
    "PassCache",
    "PassConfig",
    "PassContext",
    "PassOutput",
    "PassRun",
    "PassRunner",
    "PassSpec",
    "PassWarning",
    "ProgressEvent",
    "Tolerance",
    "TorchContext",
    "TorchData",
    "TorchModel",
    "TorchPass",
    "TorchStep",
    "check_order",
    "known_names",
    "load_pass",
    "lookup",
    "optimize",
    "optimize_torch",
    "parse_pass_ref",
    "plan",
]
