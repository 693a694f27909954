"""slipstream: make a trained model a fast, small, verified, monitored production service.

The public API is re-exported here; everything else is an implementation detail.
"""

import logging

from slipstream.artifact import Bundle, Manifest, TensorSpec
from slipstream.artifact.summary import BundleSummary, summarize
from slipstream.errors import SlipstreamError
from slipstream.evaluate import BenchReport, BenchSettings, bench
from slipstream.importers import convert
from slipstream.passes import optimize
from slipstream.runtime import Engine, Target, target

__version__ = "0.1.0"

# A library logs; the application decides where the lines go (the CLI's serve command sets JSON lines).
# Without this, warnings would reach Python's last-resort handler and interrupt the terminal output.
logging.getLogger("slipstream").addHandler(logging.NullHandler())

__all__ = [
    "BenchReport",
    "BenchSettings",
    "Bundle",
    "BundleSummary",
    "Engine",
    "Manifest",
    "SlipstreamError",
    "Target",
    "TensorSpec",
    "__version__",
    "bench",
    "convert",
    "optimize",
    "summarize",
    "target",
]
