"""String (BYTES) input columns in the profile and the monitor: category shares, unseen values, chi² and PSI.

Real data: the scikit-learn digits. Each row gets two string columns a tabular client would send beside the
pixels: the digit's name ("seven") and how much ink the scan holds ("light" … "heavy", from the row's real
pixel sum). The reference is the held-out ``ref`` split; windows are cut from the disjoint ``live`` split.
"""

from __future__ import annotations

import numpy as np
import pytest

from slipstream.monitor.categorical import codes, profile_categorical
from slipstream.monitor.drift import DriftConfig, DriftDetector, DriftReport
from slipstream.monitor.ingest import Ingestor, IngestSettings, Pending, columns
from slipstream.monitor.profile import Profile, ProfileConfig, build_profile
from slipstream.monitor.threats import ExtractionWatch, SecurityCounters
from slipstream.runtime.engine import Engine

from .conftest import Digits

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
INK = np.array(["light", "medium", "dark", "heavy"])
INK_EDGES = (250.0, 300.0, 350.0)  # pixel sums; the digits split roughly into quarters at these


def _tags(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[rows, 2]`` object array of UTF-8 bytes, as a BYTES input arrives from a client."""
    ink = INK[np.searchsorted(INK_EDGES, x.sum(axis=1))]
    return np.stack([NAMES[y], ink], axis=1).astype(bytes).astype(object)


def _profile(digits: Digits, engine: Engine, keep: np.ndarray | None = None, **config: int) -> Profile:
    x, y = digits.x_ref, digits.y_ref
    if keep is not None:
        x, y = x[keep], y[keep]
    out = engine.run({"pixels": x})
    cfg = ProfileConfig(content_sample_rows=0, **config)
    return build_profile({"pixels": x, "tags": _tags(x, y)}, out, y, cfg)


def _compare(profile: Profile, engine: Engine, x: np.ndarray, y: np.ndarray) -> DriftReport:
    return DriftDetector(profile, DriftConfig()).compare({"pixels": x, "tags": _tags(x, y)}, engine.run({"pixels": x}))


def _table(report: DriftReport, tensor: str = "tags") -> dict[str, tuple[bool, float, float]]:
    """feature -> (drifted, corrected p-value, psi)."""
    (table,) = [t for t in report.inputs if t.tensor == tensor]
    assert table.p_value is not None
    return {f: (d, p, s) for f, d, p, s in zip(table.features, table.drifted, table.p_value, table.psi, strict=True)}


def test_profile_keeps_top_categories_other_and_unseen_shares(digits: Digits, digits_engine: Engine) -> None:
    profile = _profile(digits, digits_engine, categorical_top_k=4)
    assert [t.name for t in profile.inputs] == ["pixels"]  # the strings are not numeric features
    name, ink = profile.categorical
    assert (name.feature, name.column, ink.feature, ink.column) == ("tags[0]", 0, "tags[1]", 1)
    assert len(name.categories) == 4 and name.distinct == 10 and len(name.other) == 6
    assert set(name.categories) | set(name.other) == set(NAMES)
    want = {n: float(np.mean(NAMES[digits.y_ref] == n)) for n in NAMES}
    assert name.fractions[:4] == pytest.approx([want[c] for c in name.categories])
    assert name.fractions[4] == pytest.approx(sum(want[c] for c in name.other))
    assert name.fractions[5] == 0.0 and sum(name.fractions) == pytest.approx(1.0)
    assert sorted(ink.categories) == sorted(INK) and ink.other == [] and ink.fractions[-2:] == [0.0, 0.0]
    assert Profile.from_json_bytes(profile.to_json_bytes()) == profile  # stored and read back whole


def test_rare_known_values_are_other_not_unseen(digits: Digits) -> None:
    (feature,) = profile_categorical("digit", NAMES[digits.y_ref], top_k=3, max_vocabulary=100)
    k = len(feature.categories)
    rare = feature.other[0]
    values = np.array([feature.categories[1], rare, "eleven", rare.encode(), b"\xff"], dtype=object)
    assert codes(feature, values).tolist() == [1, k, k + 1, k, k + 1]  # bytes and str alike; bad UTF-8 is unseen


def test_window_from_the_reference_distribution_does_not_alert(digits: Digits, digits_engine: Engine) -> None:
    profile = _profile(digits, digits_engine, categorical_top_k=6)
    report = _compare(profile, digits_engine, digits.x_live[:500], digits.y_live[:500])
    table = _table(report)
    assert not any(d for d, _, _ in table.values()), table
    assert all(p > 0.05 for _, p, _ in table.values()), table
    assert [c.unseen_rows for c in report.categorical] == [0, 0]
    assert not report.drifted_features


def test_shifted_category_mix_alerts(digits: Digits, digits_engine: Engine) -> None:
    """Half the window is zeros and ones (a fifth in the reference): the name column drifts."""
    profile = _profile(digits, digits_engine)
    x, y = digits.x_live, digits.y_live
    rng = np.random.default_rng(3)
    low, rest = np.flatnonzero(y <= 1), np.flatnonzero(y > 1)
    pick = np.concatenate([rng.choice(low, 150), rng.choice(rest, 150, replace=False)])
    report = _compare(profile, digits_engine, x[pick], y[pick])
    drifted, p, psi = _table(report)["tags[0]"]
    assert drifted and p < 1e-6 and psi > 0.2
    assert "tags[0]" in report.drifted_features
    assert report.categorical[0].unseen_rows == 0


def test_a_flood_of_unseen_categories_alerts_and_is_counted(digits: Digits, digits_engine: Engine) -> None:
    """The reference never saw an eight or a nine; live traffic has them in ~20 % of rows."""
    profile = _profile(digits, digits_engine, keep=digits.y_ref < 8)
    x, y = digits.x_live[:400], digits.y_live[:400]
    report = _compare(profile, digits_engine, x, y)
    drifted, p, _ = _table(report)["tags[0]"]
    name = report.categorical[0]
    assert drifted and p < 1e-6
    assert name.unseen_rows == int(np.sum(y >= 8)) and name.unseen_share == pytest.approx(np.mean(y >= 8))
    assert name.unseen_examples == ["eight", "nine"]
    assert name.window_shares[-1] == pytest.approx(name.unseen_share) and name.reference_shares[-1] == 0.0
    # the same window without the eights and nines is in distribution
    keep = y < 8
    quiet = _compare(profile, digits_engine, x[keep], y[keep])
    assert not _table(quiet)["tags[0]"][0] and quiet.categorical[0].unseen_rows == 0


def test_truncated_vocabulary_keeps_the_test_fair(digits: Digits, digits_engine: Engine) -> None:
    """With only 2 'other' names stored, the reference's rows beyond them count as 'unseen' on both sides."""
    profile = _profile(digits, digits_engine, categorical_top_k=3, categorical_max_vocabulary=2)
    name = profile.categorical[0]
    assert len(name.other) == 2 and name.fractions[-1] > 0.3
    report = _compare(profile, digits_engine, digits.x_live[:500], digits.y_live[:500])
    assert not _table(report)["tags[0]"][0]
    assert report.categorical[0].unseen_rows > 0  # counted, but the reference had as many: no alert


def test_the_servers_rolling_window_keeps_codes_and_agrees(digits: Digits, digits_engine: Engine) -> None:
    """Requests ingested as the server does (BYTES columns → bucket codes in the window) drift like compare()."""
    profile = _profile(digits, digits_engine, keep=digits.y_ref < 8)
    settings = IngestSettings("m", "1", 0.0, False, 0, 1000, 10_000, 1e9, 0)
    ingestor = Ingestor(settings, profile, None, None, ExtractionWatch(), SecurityCounters(), clock=lambda: 0.0)
    x, y = digits.x_live[:400], digits.y_live[:400]
    tags, out = _tags(x, y), digits_engine.run({"pixels": x})
    items = [
        Pending(f"r{i}", 0.0, {"pixels": x[i : i + 50], "tags": tags[i : i + 50]},
                {k: v[i : i + 50] for k, v in out.items()}, 0.001, None, None, None)
        for i in range(0, 400, 50)
    ]  # fmt: skip
    (batch,), bad = columns(items)
    ingestor.ingest(batch)
    assert bad == 0 and ingestor.errors == 0
    window = ingestor.window()
    assert window.inputs["tags"].dtype == np.int16 and window.inputs["tags"].shape == (400, 2)
    detector = DriftDetector(profile, DriftConfig())
    served = detector.compare_features(window.inputs, window.outputs, window.predicted)
    direct = detector.compare({"pixels": x, "tags": tags}, out)
    got, want = _table(served), _table(direct)
    assert [v[0] for v in got.values()] == [v[0] for v in want.values()] == [True, False]
    np.testing.assert_allclose([v[1:] for v in got.values()], [v[1:] for v in want.values()], rtol=1e-9)
    assert served.categorical[0].unseen_rows == direct.categorical[0].unseen_rows == int(np.sum(y >= 8))
    assert "tags[0]" in served.drifted_features
