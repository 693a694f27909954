"""Data for evaluation, calibration and benchmarks."""

from slipstream.data.synthetic import example_inputs

__all__ = ["example_inputs"]
