"""Quality and speed of candidate bundles on one dataset and target, cached by content.

A measurement is keyed by the model's sha256, the data's digest, the metric, the batch size, the target
and the seed, so a second build of the same recipe re-uses it instead of timing again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.build.recipe import Recipe
from slipstream.build.record import CandidateMetrics
from slipstream.data.datasets import Dataset, arrays_digest
from slipstream.evaluate.bench import BenchSettings, bench
from slipstream.evaluate.metrics import Metric
from slipstream.evaluate.quality import predict, score
from slipstream.runtime.engine import Engine
from slipstream.runtime.targets import Target


class Measurer:
    """Quality and speed of bundles on one dataset and target, cached by content."""

    def __init__(self, recipe: Recipe, dataset: Dataset, metric: Metric, tgt: Target, cache_file: Path) -> None:
        self.recipe, self.dataset, self.metric, self.target = recipe, dataset, metric, tgt
        self.reference: np.ndarray | None = None
        self.cache_file = cache_file
        self.cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        self.data_key = arrays_digest(dataset.inputs)

    def key(self, bundle: Bundle) -> str:
        r = self.recipe
        return sha256_json([bundle.model_sha256, self.data_key, r.metric, r.batch_size, r.target, r.seed])

    def measure(self, bundle: Bundle) -> tuple[CandidateMetrics, bool]:
        key = self.key(bundle)
        reference_file = self.cache_file.with_name(f".reference-{key[:16]}.npy")
        if key in self.cache and (self.reference is not None or reference_file.is_file()):
            if self.reference is None:
                self.reference = np.load(reference_file)
            return CandidateMetrics.model_validate(self.cache[key]), True
        engine = Engine(bundle, self.target)
        outputs = predict(engine, self.dataset, batch_size=256)
        if self.reference is None:
            self.reference = outputs  # the baseline's outputs are the fidelity reference
            np.save(reference_file, outputs)
        quality = score(self.metric, outputs, self.dataset, self.reference)
        budget = self.recipe.bench_time_s
        settings = BenchSettings(
            batch_sizes=(self.recipe.batch_size,), warmup_runs=3, min_time_s=budget / 4, max_time_s=budget
        )
        feeds = {self.recipe.batch_size: first_rows(self.dataset, self.recipe.batch_size)}
        report = bench(_returning(engine), settings, feeds=feeds)
        timing = report.results[0]
        metrics = CandidateMetrics(
            quality=quality,
            latency_p50_ms=timing.p50_ms,
            latency_p99_ms=timing.p99_ms,
            throughput_sps=timing.throughput_sps,
            size_bytes=bundle.size_bytes,
        )
        self.remember(key, metrics.model_dump())
        return metrics, False

    def confirm(self, baseline: Bundle, candidate: Bundle, rounds: int = 5) -> float:
        """Baseline p50 / candidate p50, each the median over ``rounds`` alternating short timings."""
        key = "confirm:" + sha256_json([self.key(baseline), self.key(candidate), rounds])
        if key in self.cache:
            cached: float = self.cache[key]
            return cached
        n = self.recipe.batch_size
        feeds = {n: first_rows(self.dataset, n)}
        budget = self.recipe.bench_time_s / 4
        settings = BenchSettings(batch_sizes=(n,), warmup_runs=3, min_time_s=budget / 2, max_time_s=budget)
        engines = (Engine(baseline, self.target), Engine(candidate, self.target))
        medians: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            for engine, out in zip(engines, medians, strict=True):
                out.append(bench(_returning(engine), settings, feeds=feeds).results[0].p50_ms)
        gain = float(np.median(medians[0]) / np.median(medians[1]))
        self.remember(key, gain)
        return gain

    def remember(self, key: str, value: Any) -> None:
        self.cache[key] = value
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.cache_file)


def _returning(engine: Engine) -> Callable[[], Engine]:
    """An engine factory for bench() that hands back an engine already built (its load time known)."""
    return lambda: engine


def first_rows(dataset: Dataset, n: int) -> dict[str, np.ndarray]:
    """``n`` rows of real data for timing, repeating the dataset if it is shorter."""
    out = {}
    for k, v in dataset.inputs.items():
        reps = -(-n // len(v))
        out[k] = np.concatenate([v] * reps)[:n] if reps > 1 else v[:n]
    return out
