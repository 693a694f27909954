from __future__ import annotations

import numpy as np
import pytest

from slipstream.errors import InputError
from slipstream.monitor.binning import bin_counts, category_counts
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


def test_in_distribution_digits_raise_no_drift_at_any_window_size(
    digits_profile: Profile, digits: Digits, digits_engine: Engine
) -> None:
    detector = DriftDetector(digits_profile)
    for rows in (25, 100, 400, 597):
        report = detector.compare(*_window(digits_engine, digits.x_live[:rows]))
        assert report.judged
        assert report.drifted_features == [] and report.drifted_outputs == [], rows
        assert report.multivariate is not None and not report.multivariate.drifted
    big = DriftDetector(digits_profile, DriftConfig(small_window_rows=500)).compare(
        *_window(digits_engine, digits.x_live)
    )
    assert big.method == "psi>0.2 or jensen_shannon>0.2 or wasserstein>0.3"
    assert big.drifted_features == [] and big.inputs[0].p_value is None


def test_noisy_and_inverted_digits_drift_inputs_outputs_and_the_multivariate_signal(
    digits_profile: Profile, digits: Digits, digits_engine: Engine
) -> None:
    detector = DriftDetector(digits_profile)
    for x in (digits.noisy(digits.x_live[:300]), Digits.inverted(digits.x_live[:300])):
        report = detector.compare(*_window(digits_engine, x))
        assert report.method == "chi2+bh(alpha=0.01)"
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
    assert ks.method == "ks+bonferroni(alpha=0.01)" and len(ks.drifted_features) >= 15
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


def test_window_from_another_model_is_refused(digits_profile: Profile) -> None:
    with pytest.raises(InputError, match="lacks inputs"):
        DriftDetector(digits_profile).compare({"image": np.zeros((30, 64), np.float32)})
    with pytest.raises(InputError, match="features in the window"):
        DriftDetector(digits_profile).compare({"pixels": np.zeros((30, 10), np.float32)})
