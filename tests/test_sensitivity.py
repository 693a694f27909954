from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from slipstream.build.sensitivity import LayerSensitivity, SensitivityReport, analyze_sensitivity
from slipstream.cli import app
from slipstream.data.datasets import load_dataset
from slipstream.errors import ConfigError
from slipstream.evaluate.metrics import get_metric
from slipstream.importers import import_onnx
from tests.onnx_models import build_trained_digits_mlp


def _report(*drops: float) -> SensitivityReport:
    layers = tuple(LayerSensitivity(node=f"n{i}", op_type="Conv", quality=0.9 - d, drop=d) for i, d in enumerate(drops))
    return SensitivityReport(
        pass_name="quantize.static", options={}, metric="accuracy", baseline_quality=0.9,
        all_layers_quality=0.9 - sum(drops), layers=layers, skipped_unnamed=0, duration_s=0.0,
    )  # fmt: skip


def test_fewest_exclusions_that_fit_the_budget() -> None:
    report = _report(0.03, 0.01, 0.004, 0.0)
    assert report.most_sensitive(0.02) == ["n0"]
    assert report.most_sensitive(0.005) == ["n0", "n1"]
    assert report.most_sensitive(0.1) == []


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("sens")
    model, x, y = build_trained_digits_mlp()
    onnx.save_model(model, str(work / "m.onnx"))
    np.savez(work / "eval.npz", pixels=x, labels=y)
    return import_onnx(work / "m.onnx", work / "b").path, work / "eval.npz"


def test_every_named_layer_is_measured_alone(digits: tuple[Path, Path]) -> None:
    from slipstream.artifact import Bundle

    bundle_dir, data = digits
    bundle = Bundle.load(bundle_dir)
    dataset = load_dataset(data, bundle.manifest.inputs)
    seen: list[str] = []
    report = analyze_sensitivity(
        bundle, dataset, get_metric("accuracy"), pass_name="prune.magnitude",
        options={"sparsity": 0.9, "min_elements": 1}, data=str(data), progress=lambda i, n, node: seen.append(node),
    )  # fmt: skip
    assert sorted(r.node for r in report.layers) == ["fc0", "fc1"] == sorted(seen)
    assert [r.drop for r in report.layers] == sorted((r.drop for r in report.layers), reverse=True)
    assert report.all_layers_quality < report.baseline_quality  # 90 % of every weight gone hurts
    assert report.layers[0].drop > 0
    with pytest.raises(ConfigError, match="Sensitivity works with"):
        analyze_sensitivity(bundle, dataset, get_metric("accuracy"), pass_name="weights.int4")  # type: ignore[arg-type]


def test_cli_sensitivity_json(digits: tuple[Path, Path]) -> None:
    bundle_dir, data = digits
    result = CliRunner().invoke(
        app, ["analyze", "sensitivity", str(bundle_dir), "--data", str(data), "--pass", "quantize.static", "--json"]
    )
    assert result.exit_code == 0, result.output
    import json

    payload = json.loads(result.stdout)
    assert payload["pass_name"] == "quantize.static" and len(payload["layers"]) == 2
    assert "suggested_nodes_to_exclude" in payload
