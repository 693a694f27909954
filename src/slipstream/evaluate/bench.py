"""Latency and throughput of an engine, measured until the median settles."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import numpy as np
import psutil
from pydantic import BaseModel, ConfigDict, Field

from slipstream.data.synthetic import example_inputs
from slipstream.errors import ConfigError
from slipstream.evaluate.flops import PeakEstimate, count_work, estimate_peak_gflops
from slipstream.evaluate.sidebyside import SideBySide
from slipstream.runtime.base import EngineBase, EngineInfo

Clock = Callable[[], float]


class BenchSettings(BaseModel):
    """How long and at which batch sizes to time a model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_sizes: tuple[int, ...] = Field(default=(1, 8, 32), min_length=1, description="Batch sizes to time.")
    warmup_runs: int = Field(default=5, ge=0, description="Untimed runs before measuring each batch size.")
    round_runs: int = Field(default=20, ge=3, description="Timed runs in the first round; each later round doubles.")
    max_rounds: int = Field(default=40, ge=1, description="Stop after this many (doubling) rounds even if unsettled.")
    min_time_s: float = Field(
        default=0.5, ge=0, description="Keep timing at least this long per batch size (for stable tails)."
    )
    max_time_s: float = Field(default=5.0, gt=0, description="Time budget per batch size, in seconds.")
    stable_rel: float = Field(
        default=0.05, gt=0, description="Settled when a round's median is within this fraction of the last."
    )
    dims: dict[str, int] = Field(default_factory=dict, description="Sizes for symbolic non-batch dims.")
    seed: int = Field(default=0, description="Seed for generated inputs.")


class BatchResult(BaseModel):
    """Latency and throughput at one batch size."""

    model_config = ConfigDict(frozen=True)

    batch: int
    runs: int
    rounds: int
    settled: bool = Field(description="Whether the median stopped moving before the budget ran out.")
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    throughput_sps: float = Field(description="Samples per second at the median latency.")
    gflop_per_run: float | None = Field(default=None, description="Counted work of one run (see flops.py).")
    achieved_gflops: float | None = Field(default=None, description="gflop_per_run / median latency.")


class BenchReport(BaseModel):
    """What `slipstream bench` measured, with the engine settings that were in force."""

    model_config = ConfigDict(frozen=True)

    model: str
    version: str
    engine: EngineInfo
    session_load_s: float
    rss_before_load_mb: float
    peak_rss_mb: float
    results: tuple[BatchResult, ...]
    peak: PeakEstimate = Field(description="This CPU's estimated fp32 peak, and how it was estimated.")
    counted_ops: dict[str, int] = Field(description="Node types counted in gflop_per_run.")
    source_framework: str | None = Field(default=None, description="What --compare timed beside the bundle.")
    comparisons: tuple[SideBySide, ...] | None = Field(
        default=None,
        description="The source framework against the bundle per batch size: interleaved, at the bundle's threads.",
    )


def _percentile(sorted_ms: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(sorted_ms), q))


def time_batch(
    run: Callable[[], object], batch: int, settings: BenchSettings, clock: Clock = time.perf_counter
) -> BatchResult:
    """Time ``run`` in rounds until the median settles or the budget is spent."""
    for _ in range(settings.warmup_runs):
        run()
    samples: list[float] = []
    last_median: float | None = None
    settled = False
    rounds = 0
    start = clock()
    while rounds < settings.max_rounds:
        rounds += 1
        # Rounds double in size, so the median is recomputed O(log n) times however fast the model is.
        for _ in range(max(settings.round_runs, len(samples))):
            t0 = clock()
            run()
            samples.append((clock() - t0) * 1000.0)
            if clock() - start > settings.max_time_s:
                break
        median = statistics.median(samples)
        elapsed = clock() - start
        stable = last_median is not None and abs(median - last_median) <= settings.stable_rel * last_median
        last_median = median
        if stable and elapsed >= min(settings.min_time_s, settings.max_time_s):
            settled = True
            break
        if elapsed > settings.max_time_s:
            break
    ordered = sorted(samples)
    p50 = _percentile(ordered, 50)
    return BatchResult(
        batch=batch,
        runs=len(samples),
        rounds=rounds,
        settled=settled,
        p50_ms=p50,
        p90_ms=_percentile(ordered, 90),
        p99_ms=_percentile(ordered, 99),
        mean_ms=statistics.fmean(samples),
        stdev_ms=statistics.pstdev(samples),
        throughput_sps=batch / (p50 / 1000.0) if p50 > 0 else float("inf"),
    )


def bench(
    engine_factory: Callable[[], EngineBase],
    settings: BenchSettings | None = None,
    *,
    feeds: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    clock: Clock = time.perf_counter,
) -> BenchReport:
    """Build the engine (timing the load) and time it at each batch size on generated inputs."""
    settings = settings or BenchSettings()
    if any(b < 1 for b in settings.batch_sizes):
        raise ConfigError(f"Batch sizes must be ≥ 1; got {list(settings.batch_sizes)}.", field="batch_sizes")
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    peak = rss_before
    engine = engine_factory()
    model = engine.bundle.load_model()
    counted_ops: dict[str, int] = {}
    results: list[BatchResult] = []
    for batch in settings.batch_sizes:
        data = dict(feeds[batch]) if feeds and batch in feeds else None
        data = data or example_inputs(engine.inputs, batch, dims=settings.dims, seed=settings.seed)
        checked = engine.check_inputs(data)
        timed = time_batch(partial(engine.run, checked, check=False), batch, settings, clock)
        work = count_work(model, {k: v.shape for k, v in checked.items()})
        counted_ops = work.counted_ops
        gflop = work.flops / 1e9
        results.append(
            timed.model_copy(update={"gflop_per_run": gflop, "achieved_gflops": gflop / (timed.p50_ms / 1000.0)})
        )
        peak = max(peak, proc.memory_info().rss)
    manifest = engine.bundle.manifest
    return BenchReport(
        model=manifest.name,
        version=manifest.version,
        engine=engine.resolved(),
        session_load_s=engine.load_time_s,
        rss_before_load_mb=rss_before / 2**20,
        peak_rss_mb=max(peak, _peak_rss_bytes()) / 2**20,
        results=tuple(results),
        peak=estimate_peak_gflops(),
        counted_ops=counted_ops,
    )


def _peak_rss_bytes() -> int:
    import resource

    # ru_maxrss is in KiB on Linux: the high-water mark of the whole process.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
