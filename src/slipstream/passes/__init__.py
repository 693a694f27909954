"""Optimization and compression passes: bundle in, new bundle out, one lineage entry each."""

from slipstream.passes.base import OnnxPass, Pass, PassConfig, PassContext, PassOutput, PassRun, PassWarning
from slipstream.passes.cache import PassCache
from slipstream.passes.catalogue import CATALOGUE, PassSpec, check_order, known_names, load_pass, lookup
from slipstream.passes.recipe import ProgressEvent, optimize, parse_pass_ref, plan

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
    "check_order",
    "known_names",
    "load_pass",
    "lookup",
    "optimize",
    "parse_pass_ref",
    "plan",
]
