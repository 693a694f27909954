"""Content-drift detectors: quiet on null windows, loud on real shifts, clear on bad input."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slipstream.errors import InputError
from slipstream.monitor.shift import (
    MMDDetector,
    OutputShiftDetector,
    ShiftResult,
    _ks_statistics,
    chi2_sf,
    kolmogorov_sf,
    softmax,
)

CLASSES = 10


def _probs(rng: np.random.Generator, rows: int, prior: np.ndarray | None = None) -> np.ndarray:
    """Softmax outputs of a decent 10-class classifier: the true class gets a boost, plus noise."""
    p = np.full(CLASSES, 1 / CLASSES) if prior is None else prior / prior.sum()
    y = rng.choice(CLASSES, size=rows, p=p)
    logits = rng.normal(0, 1, (rows, CLASSES))
    logits[np.arange(rows), y] += 3.0
    return softmax(logits)


def _correlated(rng: np.random.Generator, rows: int, rho: float, dims: int = 8) -> np.ndarray:
    """Standard-normal columns; the first two correlated by rho (marginals unchanged by rho)."""
    x = rng.normal(size=(rows, dims))
    x[:, 1] = rho * x[:, 0] + np.sqrt(1 - rho**2) * x[:, 1]
    return x


def test_softmax_is_stable_and_normalized() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]))
    assert np.isfinite(p).all()
    assert np.allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] == pytest.approx(1.0)
    e = np.exp([1.0, 2.0, 3.0])
    assert np.allclose(p[1], e / e.sum())


def test_mmd_null_windows_rarely_fire_and_p_values_are_roughly_uniform() -> None:
    rng = np.random.default_rng(0)
    det = MMDDetector(rng.normal(size=(300, 8)), alpha=0.01, permutations=200, seed=1)
    ps = np.array([det.test(rng.normal(size=(60, 8))).p_value for _ in range(50)])
    assert np.count_nonzero(ps < 0.01) <= 2
    # Coarse uniformity: each half and the bottom fifth hold about their share.
    assert 0.3 <= np.mean(ps < 0.5) <= 0.7
    assert 0.05 <= np.mean(ps < 0.2) <= 0.4


def test_mmd_sees_a_mean_shift_and_a_correlation_change_with_equal_marginals() -> None:
    rng = np.random.default_rng(1)
    ref = _correlated(rng, 500, rho=0.9)
    det = MMDDetector(ref, alpha=0.01)
    shifted = rng.normal(size=(200, 8))
    shifted[:, :3] += 0.5
    assert det.test(shifted).drifted
    # Same per-column distributions as the reference, only the dependence between columns 0 and 1 is gone:
    # invisible to any per-feature test, seen by the kernel test.
    decorrelated = det.test(_correlated(rng, 300, rho=0.0))
    assert decorrelated.drifted and decorrelated.judged
    assert decorrelated.p_value < 0.01
    assert not det.test(_correlated(rng, 300, rho=0.9)).drifted


def test_mmd_statistic_equals_the_textbook_biased_mmd2() -> None:
    rng = np.random.default_rng(2)
    ref, win = rng.normal(size=(60, 5)), rng.normal(0.3, 1.0, size=(40, 5))
    det = MMDDetector(ref, permutations=50)

    def sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    d_ref = sq(ref, ref)
    median = np.median(d_ref[np.triu_indices(60, k=1)])
    k = lambda a, b: np.exp(-sq(a, b) / median)  # noqa: E731 - a one-line kernel reads best inline
    expected = k(win, win).mean() + k(ref, ref).mean() - 2 * k(win, ref).mean()
    result = det.test(win)
    assert result.statistic == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert det.bandwidth == pytest.approx(np.sqrt(median / 2), rel=1e-5)


def test_mmd_is_deterministic_and_subsamples_evenly() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(300, 4))
    det = MMDDetector(ref, max_reference_rows=200, max_window_rows=150, seed=7)
    win = rng.normal(size=(400, 4))
    first, second = det.test(win), det.test(win)
    assert first.p_value == second.p_value
    assert MMDDetector(ref, max_reference_rows=200, max_window_rows=150, seed=7).test(win).p_value == first.p_value
    assert (first.rows, first.used_rows, first.reference_rows) == (400, 150, 200)


def test_output_shift_null_windows_rarely_fire() -> None:
    rng = np.random.default_rng(4)
    det = OutputShiftDetector(_probs(rng, 1000), alpha=0.01)
    results = [det.test(_probs(rng, 200)) for _ in range(50)]
    assert sum(r.drifted for r in results) <= 2
    ps = np.array([r.p_value for r in results])
    # Bonferroni over k + 1 tests is conservative, never anti-conservative.
    assert np.mean(ps < 0.1) <= 0.2


def test_output_shift_fires_on_a_class_mix_change() -> None:
    rng = np.random.default_rng(5)
    det = OutputShiftDetector(_probs(rng, 1000), alpha=0.01)
    prior = np.ones(CLASSES)
    prior[3] = 5.0
    result = det.test(_probs(rng, 200, prior))
    assert result.drifted and result.judged and result.p_value < 0.01
    assert result.test == "output_ks" and result.reference_rows == 1000
    # Only digits 0-4: the predicted-class chi² or a column KS decides.
    only_low = det.test(_probs(rng, 200, np.r_[np.ones(5), np.zeros(5)]))
    assert only_low.drifted and "smallest p" in only_low.reason


def test_output_shift_fires_when_the_model_becomes_unsure() -> None:
    rng = np.random.default_rng(6)
    det = OutputShiftDetector(_probs(rng, 1000))
    y = rng.choice(CLASSES, size=200)
    logits = rng.normal(0, 1, (200, CLASSES))
    logits[np.arange(200), y] += 1.0  # same class mix, much lower confidence
    assert det.test(softmax(logits)).drifted


@pytest.mark.parametrize("which", ["mmd", "output"])
def test_too_few_rows_are_not_judged_with_a_reason(which: str) -> None:
    rng = np.random.default_rng(7)
    det: MMDDetector | OutputShiftDetector = (
        MMDDetector(rng.normal(size=(100, 3)), min_rows=20)
        if which == "mmd"
        else OutputShiftDetector(_probs(rng, 100), min_rows=20)
    )
    window = rng.normal(size=(5, 3)) if which == "mmd" else _probs(rng, 5)
    result = det.test(window)
    assert isinstance(result, ShiftResult)
    assert not result.judged and not result.drifted and result.p_value == 1.0
    assert "need ≥ 20, got 5" in result.reason


def test_bad_input_raises_input_error_that_says_what_to_do() -> None:
    rng = np.random.default_rng(8)
    mmd = MMDDetector(rng.normal(size=(100, 3)))
    with pytest.raises(InputError, match="has 4 columns; the reference has 3"):
        mmd.test(rng.normal(size=(50, 4)))
    bad = rng.normal(size=(50, 3))
    bad[7, 1] = np.nan
    with pytest.raises(InputError, match=r"NaN or infinite.*first at row 7"):
        mmd.test(bad)
    with pytest.raises(InputError, match="must be 2-D"):
        mmd.test(rng.normal(size=50))
    out = OutputShiftDetector(_probs(rng, 100))
    with pytest.raises(InputError, match="not probabilities") as err:
        out.test(rng.normal(size=(50, CLASSES)))
    assert err.value.hint is not None and "softmax" in err.value.hint
    with pytest.raises(InputError, match="not probabilities"):
        OutputShiftDetector(rng.normal(size=(100, CLASSES)))
    with pytest.raises(InputError, match="alpha"):
        MMDDetector(rng.normal(size=(100, 3)), alpha=1.5)


def test_p_value_formulas_match_reference_values() -> None:
    # Reference values from scipy.stats (chi2.sf; ks_2samp's exact p for 1000 vs 100 rows, D = 0.1107).
    assert chi2_sf(30.0, 9) == pytest.approx(0.00043872177097947936, rel=1e-9)
    assert chi2_sf(3.0, 1) == pytest.approx(0.08326451666355042, rel=1e-9)
    assert chi2_sf(200.0, 50) == pytest.approx(7.857610724654791e-20, rel=1e-6)
    assert chi2_sf(0.0, 4) == 1.0
    p = kolmogorov_sf(np.array([0.0, 0.05, 0.3]), 1000 * 100 / 1100)
    assert p[0] == 1.0 and p[1] > 0.9 and p[2] < 1e-6


def _benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/drift_detection.py, imported from its file (benchmarks/ is not a package)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # the module sets them; undone after the test
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "drift_detection.py"
    spec = importlib.util.spec_from_file_location("drift_detection_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_drift_benchmark_runs_its_smallest_configuration_on_tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _benchmark_module(monkeypatch)
    # Two digit shifts (one too big for this pool) and one text shift keep the run well under 2 s.
    picked = [s for s in bench.DIGIT_SHIFTS if s.intensity in ("90°", "only 0-4")]
    monkeypatch.setattr(bench, "DIGIT_SHIFTS", picked)
    monkeypatch.setattr(bench, "TEXT_SHIFTS", bench.TEXT_SHIFTS[-1:])
    cfg = bench.Config(windows=(30,), ref_rows=60, references=1, nulls_per_reference=8, english=120)
    rng = np.random.default_rng(9)
    pool = 100
    labels = rng.integers(0, CLASSES, pool)
    variants = ["identity", *sorted({s.source for s in bench.DIGIT_SHIFTS} - {"identity"})]
    logits = rng.normal(0, 1, (pool, CLASSES)) + 3 * np.eye(CLASSES)[labels]
    tables: dict[str, list[np.ndarray]] = {"digits/softmax": [], "digits/penult": [], "digits/pixels": []}
    for v in variants:
        moved = 0.0 if v == "identity" else 2.0  # every synthetic "variant" is a strong shift
        tables["digits/softmax"].append(softmax(logits + moved * rng.normal(0, 1, logits.shape)))
        tables["digits/penult"].append(rng.normal(moved, 1, (pool, 6)))
        tables["digits/pixels"].append(rng.normal(0, 1, (pool, 2)))
    emb = np.concatenate([rng.normal(0, 1, (120, 8)), rng.normal(1.5, 1, (80, 8))])
    plan = bench.Plan(tables={k: np.concatenate(v) for k, v in tables.items()} | {"text/emb": emb}, references={})
    bench.plan_digits(pool, labels, variants, cfg, plan)
    bench.plan_text({"english": (0, 120), "topic": (120, 160), "foreign": (160, 200)}, cfg, plan)
    scores = bench.run_ours(plan)
    cells, nulls = bench.rates(plan, scores, "mmd", "digits", lambda w: True)
    assert cells[("rotation", "90°", 30)].rate == 1.0 and cells[("rotation", "90°", 30)].n == 1
    assert nulls[30][1] <= 0.05 and nulls[30][2] == 8
    report = bench.render(plan, scores, cfg, [], [], {}, None, ["--tiny"], 0.0)
    assert "| rotation | 90° | " in report and "only 0-4" in report  # too few rows of 0-4 here: skipped, said so
    # The calibrated threshold drops below 0.05 when nulls would alarm more than 5 % of the time.
    assert bench.threshold(np.r_[np.full(10, 0.001), np.full(90, 0.5)]) == 0.001


def test_ks_statistic_is_exact_with_ties() -> None:
    rng = np.random.default_rng(10)
    ref = np.round(rng.random((300, 3)), 1)  # heavy ties, on both sides
    win = np.round(rng.random((70, 3)) ** 1.5, 1)
    got = _ks_statistics(np.sort(ref, axis=0).T, win)
    for j in range(3):
        points = np.concatenate([ref[:, j], win[:, j]])
        f_ref = (ref[:, j][None, :] <= points[:, None]).mean(axis=1)
        f_win = (win[:, j][None, :] <= points[:, None]).mean(axis=1)
        assert got[j] == pytest.approx(np.abs(f_ref - f_win).max(), abs=1e-12)
