"""Optimization and compression passes: bundle in, new bundle out, one lineage entry each."""

from slipstream.passes.base import OnnxPass, Pass, PassConfig, PassContext, PassOutput, PassRun, PassWarning
from slipstream.passes.cache import PassCache
from slipstream.passes.catalogue import CATALOGUE, PassSpec, check_order, known_names, load_pass, lookup
from slipstream.passes.recipe import ProgressEvent, optimize, parse_pass_ref, plan
from slipstream.passes.torch_base import TorchContext, TorchPass
from slipstream.passes.torch_model import TorchData, TorchModel
from slipstream.passes.torch_recipe import optimize_torch

__all__ = [
    "CATALOGUE",
    "OnnxPass",
    "Pass",
    "PassCache",
    "PassConfig",
    "PassContext",
    "PassOutput",
    "PassRun",
    "PassSpec",
    "PassWarning",
    "ProgressEvent",
    "TorchContext",
    "TorchData",
    "TorchModel",
    "TorchPass",
    "check_order",
    "known_names",
    "load_pass",
    "lookup",
    "optimize",
    "optimize_torch",
    "parse_pass_ref",
    "plan",
]
