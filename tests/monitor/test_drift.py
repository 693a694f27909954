from __future__ import annotations

import numpy as np
import pytest

from slipstream.errors import InputError
from slipstream.monitor.binning import bin_counts, category_counts, decile_edges
from slipstream.monitor.drift import DriftConfig, DriftDetector
from slipstream.monitor.profile import DECILE_LEVELS, Profile, build_profile
from slipstream.runtime.engine import Engine
from tests.monitor.conftest import Digits


def _window(engine: Engine, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return {"pixels": x}, engine.run({"pixels": x})


def test_bin_counts_match_a_per_column_searchsorted() -> None:
    rng = np.random.default_rng(0)
    ref = np.round(rng.normal(size=(500, 7)) * 3)  # ties and repeated edges
    ref[:, 3] = 0.0  # a constant column: every edge equal
    edges = np.quantile(ref, DECILE_LEVELS, axis=0).T
    window = np.round(rng.normal(size=(301, 7)) * 3).astype(np.float32)
    got = bin_counts(window, edges, chunk_rows=64)
    for j in range(7):
        want = np.bincount(np.searchsorted(edges[j].astype(np.float32), window[:, j], side="right"), minlength=10)
        assert got[j].tolist() == want.tolist()
    assert category_counts(np.array([0.0, 2.0, 2.0, 7.0]), np.array([0.0, 1.0, 2.0])).tolist() == [1, 0, 2, 1]


def test_tied_deciles_give_a_bin_below_at_and_above_each_tied_value() -> None:
    rng = np.random.default_rng(1)
    sparse = rng.poisson(0.1, 5000)  # about 90 % zeros: every decile is 0
    counts = rng.poisson(3.0, 5000)
    binary = (rng.random(5000) < 0.95).astype(np.float64)  # every decile is 1
    ref = np.stack([sparse, counts, binary, np.zeros(5000)], axis=1).astype(np.float64)
    edges = decile_edges(ref, np.asarray(DECILE_LEVELS))
    got = bin_counts(ref.astype(np.float32), edges)
    live = [row[row > 0].tolist() for row in got]
    assert live[0] == [int((sparse == 0).sum()), int((sparse > 0).sum())]  # zeros apart from the counts above
    values, freq = np.unique(counts, return_counts=True)
    inner = [int(f) for v, f in zip(values, freq, strict=True) if edges[1, 0] <= v < edges[1, -1]]
    assert live[1][1:-1] == inner  # each distinct value between the first and the last decile its own bin
    assert live[2] == [int((binary == 0).sum()), int((binary == 1).sum())]
    assert live[3] == [5000]
    # Continuous columns keep their plain deciles.
    x = rng.normal(size=(1000, 3))
    assert np.array_equal(decile_edges(x, np.asarray(DECILE_LEVELS)), np.quantile(x, DECILE_LEVELS, axis=0).T)


def test_in_distribution_digits_raise_no_drift_at_any_window_size(
    digits_profile: Profile, digits: Digits, digits_engine: Engine
) -> None:
    detector = DriftDetector(digits_profile)
    for rows in (25, 100, 400, 597):
        report = detector.compare(*_window(digits_engine, digits.x_live[:rows]))
        assert report.judged
        assert report.drifted_features == [] and report.drifted_outputs == [], rows
        assert report.multivariate is not None and not report.multivariate.drifted
    # The test decides every window size; the older effect-size rule still decides large windows when asked.
    tested = detector.compare(*_window(digits_engine, digits.x_live))
    assert tested.method == "chi2+bh(alpha=0.0025) and psi>=0.02" and tested.inputs[0].p_value is not None
    assert tested.drifted_features == [] and tested.drifted_outputs == []
    big = DriftDetector(digits_profile, DriftConfig(decide_by="any", small_window_rows=500)).compare(
        *_window(digits_engine, digits.x_live)
    )
    assert big.method == "psi>0.2 or jensen_shannon>0.2 or wasserstein>0.3"
    assert big.drifted_features == [] and big.inputs[0].p_value is None
    small = DriftDetector(digits_profile, DriftConfig(decide_by="any", small_window_rows=500)).compare(
        *_window(digits_engine, digits.x_live[:400])
    )
    assert small.method == "chi2+bh(alpha=0.0025)" and small.inputs[0].p_value is not None


def test_noisy_and_inverted_digits_drift_inputs_outputs_and_the_multivariate_signal(
    digits_profile: Profile, digits: Digits, digits_engine: Engine
) -> None:
    detector = DriftDetector(digits_profile)
    for x in (digits.noisy(digits.x_live[:300]), Digits.inverted(digits.x_live[:300])):
        report = detector.compare(*_window(digits_engine, x))
        assert report.method == "chi2+bh(alpha=0.0025) and psi>=0.02"
        assert report.inputs[0].method == report.method and report.inputs[0].p_value is not None
        assert len(report.drifted_features) >= 15
        assert report.drifted_outputs, "the output distribution moves too"
        assert report.multivariate is not None and report.multivariate.drifted
        assert report.multivariate.method.startswith("pca_reconstruction")


def test_tiny_windows_are_not_judged(digits_profile: Profile, digits: Digits) -> None:
    report = DriftDetector(digits_profile).compare({"pixels": Digits.inverted(digits.x_live[:5])})
    assert not report.judged and report.method == "none(rows<20)" and report.drifted_features == []


def test_ks_and_bonferroni_are_used_when_asked(digits_profile: Profile, digits: Digits) -> None:
    x = Digits.inverted(digits.x_live[:200])
    ks = DriftDetector(digits_profile, DriftConfig(test="ks", correction="bonferroni")).compare({"pixels": x})
    assert ks.method == "ks+bonferroni(alpha=0.0025) and psi>=0.02" and len(ks.drifted_features) >= 15
    bh = DriftDetector(digits_profile, DriftConfig(test="ks", correction="bh")).compare({"pixels": x})
    # BH never rejects fewer than Bonferroni at the same level.
    assert set(ks.drifted_features) <= set(bh.drifted_features)
    assert all(b <= k for b, k in zip(bh.inputs[0].p_value or [], ks.inputs[0].p_value or [], strict=True))


def test_wide_window_finds_every_shifted_column_and_nothing_else() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(4000, 200)).astype(np.float32)
    profile = build_profile({"x": ref}, {"y": ref[:, :1]})
    window = rng.normal(size=(4000, 200)).astype(np.float32)
    clean = DriftDetector(profile).compare({"x": window})
    assert clean.drifted_features == []
    moved = rng.choice(200, size=20, replace=False)
    window[:, moved[:10]] += 0.5
    window[:, moved[10:]] *= 1.6
    shifted = DriftDetector(profile).compare({"x": window})
    assert sorted(shifted.drifted_features) == sorted(f"x[{j}]" for j in moved)
    psi = np.asarray(shifted.inputs[0].psi)
    assert psi[moved].min() > 0.2 > np.delete(psi, moved).max()
    p = np.asarray(shifted.inputs[0].p_value)
    assert p[moved].max() < 1e-6 and np.delete(p, moved).min() > 0.01


def _counts(rng: np.random.Generator, rows: int, rates: np.ndarray, levels: int) -> np.ndarray:
    """Small-count Poisson columns (their deciles tie) beside 5-level discrete columns."""
    poisson = rng.poisson(rates, size=(rows, len(rates)))
    discrete = rng.integers(0, levels, size=(rows, len(rates)))
    return np.concatenate([poisson, discrete], axis=1).astype(np.float32)


def test_shifted_small_count_columns_with_tied_deciles_are_found_and_the_unshifted_are_not() -> None:
    rng = np.random.default_rng(5)
    rates = np.linspace(0.3, 3.0, 8)
    ref = _counts(rng, 10_000, rates, 5)
    profile = build_profile({"x": ref}, {"y": np.zeros((10_000, 1), np.float32)})
    assert all(len(set(e)) < 9 for e in np.quantile(ref, DECILE_LEVELS, axis=0).T), "every column's deciles tie"
    detector = DriftDetector(profile)
    clean = detector.compare({"x": _counts(rng, 2000, rates, 5)})
    assert clean.drifted_features == []
    # Each Poisson rate moves by half a standard deviation (sqrt(rate)); the discrete columns stay.
    window = _counts(rng, 2000, rates + 0.5 * np.sqrt(rates), 5)
    report = detector.compare({"x": window})
    assert sorted(report.drifted_features) == sorted(f"x[{j}]" for j in range(8))
    # The older fixed PSI threshold missed most of them: their PSI is under 0.2.
    psi = np.asarray(report.inputs[0].psi[:8])
    assert (psi < 0.2).sum() >= 4
    old = DriftDetector(profile, DriftConfig(decide_by="psi")).compare({"x": window})
    assert len(old.drifted_features) <= 4


def test_a_shift_of_a_column_that_is_mostly_zero_is_found() -> None:
    """All nine deciles of a 0.1-rate Poisson column are 0; its counts above 0 must still be visible."""
    rng = np.random.default_rng(7)
    rates = np.array([0.05, 0.1, 0.1, 0.1])
    profile = build_profile({"x": rng.poisson(rates, (10_000, 4)).astype(np.float32)}, {"y": np.zeros((10_000, 1))})
    detector = DriftDetector(profile)
    assert detector.compare({"x": rng.poisson(rates, (2000, 4)).astype(np.float32)}).drifted_features == []
    moved = rates.copy()
    moved[1:] += 0.5 * np.sqrt(rates[1:])  # +0.16: half a standard deviation
    report = detector.compare({"x": rng.poisson(moved, (2000, 4)).astype(np.float32)})
    assert report.drifted_features == ["x[1]", "x[2]", "x[3]"]


def test_the_psi_floor_keeps_a_negligible_shift_in_a_huge_window_quiet() -> None:
    rng = np.random.default_rng(6)
    profile = build_profile({"x": rng.normal(size=(20_000, 3))}, {"y": np.zeros((20_000, 1))})
    window = rng.normal(size=(20_000, 3))
    window[:, 0] += 0.08  # significant at 20,000 rows, PSI ~0.006
    floor = DriftDetector(profile).compare({"x": window})
    assert floor.inputs[0].p_value is not None and floor.inputs[0].p_value[0] < 1e-3
    assert floor.inputs[0].psi[0] < 0.02 and floor.drifted_features == []
    bare = DriftDetector(profile, DriftConfig(min_psi=0)).compare({"x": window})
    assert bare.method == "chi2+bh(alpha=0.0025)" and bare.drifted_features == ["x[0]"]


def test_window_from_another_model_is_refused(digits_profile: Profile) -> None:
    with pytest.raises(InputError, match="lacks inputs"):
        DriftDetector(digits_profile).compare({"image": np.zeros((30, 64), np.float32)})
    with pytest.raises(InputError, match="features in the window"):
        DriftDetector(digits_profile).compare({"pixels": np.zeros((30, 10), np.float32)})
