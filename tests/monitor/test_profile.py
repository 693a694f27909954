from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slipstream.artifact import Bundle
from slipstream.errors import BundleExistsError, DataError, SchemaError
from slipstream.monitor.features import featurize
from slipstream.monitor.profile import (
    DECILE_LEVELS,
    PROFILE_FILE,
    PROFILE_STEP,
    Profile,
    build_profile,
    load_profile,
    write_profiled_bundle,
)
from tests.monitor.conftest import Digits


def test_profile_of_digits_classifier_has_stats_bins_classes_and_accuracy(
    digits_profile: Profile, digits: Digits
) -> None:
    p = digits_profile
    assert p.rows == 600
    (pixels,) = p.inputs
    assert pixels.kind == "tabular" and len(pixels.features.names) == 64
    f = pixels.features
    j = 20  # a busy pixel in the middle of the digit
    column = digits.x_ref[:, j].astype(np.float64)
    assert f.min[j] == column.min() and f.max[j] == column.max()
    assert f.mean[j] == pytest.approx(column.mean()) and f.std[j] == pytest.approx(column.std())
    assert f.quantiles[j][p.quantile_levels.index(0.5)] == pytest.approx(np.median(column))
    assert len(f.bin_edges[j]) == len(DECILE_LEVELS) and len(f.bin_fractions[j]) == len(DECILE_LEVELS) + 1
    assert sum(f.bin_fractions[j]) == pytest.approx(1.0)
    # Fractions are what the reference actually has in each bin (ties make them differ from 0.1).
    edges = np.asarray(f.bin_edges[j])
    idx = np.searchsorted(edges, column, side="right")
    assert f.bin_fractions[j] == pytest.approx((np.bincount(idx, minlength=10) / 600).tolist())
    spec = p.prediction
    assert spec is not None and spec.task == "classification" and spec.kind == "probabilities"
    assert spec.output == "probabilities" and spec.classes == [float(c) for c in range(10)]
    assert sum(spec.class_fractions) == pytest.approx(1.0)
    assert 0.9 < p.metrics["accuracy"] <= 1.0 and 0.9 < p.metrics["f1_macro"] <= 1.0
    assert p.calibration is not None and len(p.calibration.accuracy) == len(p.calibration.edges) + 1
    assert p.multivariate is not None and 1 <= len(p.multivariate.components) <= 32


def test_profile_round_trips_through_json(digits_profile: Profile) -> None:
    again = Profile.from_json_bytes(digits_profile.to_json_bytes())
    assert again == digits_profile


def test_newer_or_broken_profile_is_refused(digits_profile: Profile) -> None:
    raw = json.loads(digits_profile.to_json_bytes())
    raw["schema_version"] = 99
    with pytest.raises(SchemaError, match="schema version 99"):
        Profile.from_json_bytes(json.dumps(raw).encode())
    with pytest.raises(SchemaError, match="not valid JSON"):
        Profile.from_json_bytes(b"{nope")


def test_image_tensors_are_profiled_per_channel() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(0.5, 0.1, (50, 3, 8, 8)).astype(np.float32)
    images[:, 2] += 1.0  # a brighter blue channel
    p = build_profile({"image": images}, {"score": images.mean(axis=(1, 2, 3))})
    (t,) = p.inputs
    assert t.kind == "image" and t.row_shape == [3, 8, 8]
    assert t.features.names == [f"image[c{c}].{s}" for c in range(3) for s in ("mean", "std")]
    assert [round(c.mean, 1) for c in t.channels] == [0.5, 0.5, 1.5]
    assert featurize(images).shape == (50, 6)
    assert p.prediction is not None and p.prediction.task == "regression"


def test_regression_profile_records_mae() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = x.sum(axis=1)
    pred = y + rng.normal(0, 0.1, 200)
    p = build_profile({"x": x}, {"y": pred.reshape(-1, 1)}, y)
    assert p.prediction is not None and p.prediction.task == "regression"
    assert p.metrics["mae"] == pytest.approx(np.mean(np.abs(pred - y)))


def test_bad_reference_data_is_refused() -> None:
    with pytest.raises(DataError, match="same number of rows"):
        build_profile({"x": np.zeros((5, 2))}, {"y": np.zeros((4, 1))})
    bad = np.zeros((5, 2))
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        build_profile({"x": bad}, {"y": np.zeros((5, 1))})


def test_profile_is_written_into_a_new_bundle(digits_bundle: Path, digits_profile: Profile, tmp_path: Path) -> None:
    before = sorted(p.name for p in digits_bundle.iterdir())
    out = write_profiled_bundle(digits_bundle, tmp_path / "profiled", digits_profile)
    assert sorted(p.name for p in digits_bundle.iterdir()) == before  # the source is untouched
    bundle = Bundle.load(out)  # verifies every hash, profile.json included
    assert PROFILE_FILE in bundle.manifest.files
    assert bundle.manifest.lineage[-1].step == PROFILE_STEP
    assert bundle.model_sha256 == Bundle.load(digits_bundle).model_sha256
    assert load_profile(out) == digits_profile
    assert load_profile(digits_bundle) is None
    with pytest.raises(BundleExistsError):
        write_profiled_bundle(digits_bundle, out, digits_profile)


def test_profile_from_a_checked_dataset(digits_bundle: Path, digits: Digits) -> None:
    from slipstream.artifact import Bundle as _Bundle
    from slipstream.data.datasets import check_dataset
    from slipstream.monitor.profile import profile_from_dataset

    specs = _Bundle.load(digits_bundle).manifest.inputs
    dataset = check_dataset({"pixels": digits.x_ref[:200]}, digits.y_ref[:200], specs, "digits")
    p = profile_from_dataset(digits_bundle, dataset)
    assert p.rows == 200 and "accuracy" in p.metrics and p.prediction is not None
