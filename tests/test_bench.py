from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from slipstream.artifact import Bundle
from slipstream.data import example_inputs
from slipstream.errors import ConfigError
from slipstream.evaluate import BenchSettings, bench
from slipstream.evaluate.bench import time_batch
from slipstream.runtime import Engine, Target


class FakeClock:
    """A clock that moves only when a fake run says it took some milliseconds."""

    def __init__(self, run_ms: Iterator[float]) -> None:
        self.now = 0.0
        self._run_ms = run_ms

    def __call__(self) -> float:
        return self.now

    def run(self) -> None:
        self.now += next(self._run_ms) / 1000.0


def _settings(**kw: object) -> BenchSettings:
    base: dict[str, object] = {"warmup_runs": 0, "round_runs": 10, "min_time_s": 0.0, "max_time_s": 100.0}
    return BenchSettings.model_validate({**base, **kw})


def test_stops_when_the_median_settles() -> None:
    clock = FakeClock(iter([2.0] * 1000))
    result = time_batch(clock.run, 4, _settings(), clock)
    assert result.settled and result.rounds == 2 and result.runs == 20
    assert result.p50_ms == pytest.approx(2.0)
    assert result.throughput_sps == pytest.approx(2000.0)


def test_keeps_going_while_the_median_moves_and_reports_tails() -> None:
    # Runs slow down from 1 ms to 4 ms; rounds of 10, 10, 20, 40, 80 runs move the running median
    # 1, 1.5, 3, 4, 4: settled in round 5.
    times = itertools.chain([1.0] * 10, [2.0] * 10, itertools.repeat(4.0))
    clock = FakeClock(times)
    result = time_batch(clock.run, 1, _settings(), clock)
    assert result.settled and result.rounds == 5 and result.runs == 160
    assert result.p99_ms == pytest.approx(4.0)
    assert result.mean_ms == pytest.approx((10 * 1 + 10 * 2 + 140 * 4) / 160)
    assert result.stdev_ms > 0


def test_budget_ends_an_unsettled_run() -> None:
    times = (float(2**i) for i in range(1000))
    clock = FakeClock(times)
    result = time_batch(clock.run, 1, _settings(round_runs=3, max_time_s=0.05), clock)
    assert not result.settled
    assert result.runs < 30


def test_minimum_time_is_respected() -> None:
    clock = FakeClock(iter([10.0] * 10_000))
    result = time_batch(clock.run, 1, _settings(min_time_s=1.0), clock)
    assert result.runs >= 100  # 10 ms runs for at least one second


def test_bench_on_a_real_engine(mlp_bundle: Bundle) -> None:
    settings = BenchSettings(batch_sizes=(1, 4), warmup_runs=1, round_runs=5, min_time_s=0.0, max_time_s=0.2)
    report = bench(lambda: Engine(mlp_bundle, Target(intra_op_threads=1)), settings)
    assert [r.batch for r in report.results] == [1, 4]
    for r in report.results:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.throughput_sps > 0
    assert report.engine.providers == ("CPUExecutionProvider",)
    assert report.session_load_s > 0
    assert report.peak_rss_mb >= report.rss_before_load_mb > 0
    assert report.model == "mlp"


def test_bad_batch_size(mlp_bundle: Bundle) -> None:
    with pytest.raises(ConfigError):
        bench(lambda: Engine(mlp_bundle), BenchSettings(batch_sizes=(0,)))


def test_example_inputs_follow_specs_and_ranges(mlp_bundle: Bundle) -> None:
    spec = mlp_bundle.manifest.inputs[0].model_copy(update={"value_range": (0.0, 16.0)})
    feeds = example_inputs([spec], 3, seed=1)
    x = feeds["pixels"]
    assert x.shape == (3, 8) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 16.0
    again = example_inputs([spec], 3, seed=1)
    np.testing.assert_array_equal(again["pixels"], x)
