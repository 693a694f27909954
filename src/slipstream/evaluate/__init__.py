"""Measure bundles: speed now; quality metrics come with the build."""

from slipstream.evaluate.bench import BatchResult, BenchReport, BenchSettings, bench

__all__ = ["BatchResult", "BenchReport", "BenchSettings", "bench"]
