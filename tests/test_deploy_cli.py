"""`slipstream export` on the command line: progress, the result, and errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slipstream.cli import app

runner = CliRunner()


def test_export_triton_json(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(mlp_bundle_dir), "--to", "triton", "-o", str(tmp_path / "t"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["target"] == "triton" and "mlp/config.pbtxt" in doc["files"]
    assert doc["models"] == ["mlp/1"]


@pytest.mark.slow
def test_export_prints_progress_and_files(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    args = ["export", str(mlp_bundle_dir), "--to", "kserve", "-o", str(tmp_path / "k"), "--storage-uri", "s3://b/m"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "verified 1 bundle(s): mlp/1" in result.output
    assert "inferenceservice.yaml" in result.output


def test_refusal_and_bad_options_exit_1_with_a_hint(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    refused = runner.invoke(app, ["export", str(mlp_bundle_dir), "--to", "kserve", "-o", str(tmp_path / "k"), "--json"])
    assert refused.exit_code == 1
    doc = json.loads(refused.stdout)
    assert doc["type"] == "ExportRefusedError" and "--storage-uri" in doc["error"]
    bad = runner.invoke(app, ["export", str(mlp_bundle_dir), "--to", "edge", "-o", str(tmp_path / "e"),
                              "--architecture", "sparc", "--json"])  # fmt: skip
    assert bad.exit_code == 1
    assert "architecture" in json.loads(bad.stdout)["error"]
    unknown = runner.invoke(app, ["export", str(mlp_bundle_dir), "--to", "kserv", "-o", str(tmp_path / "x"), "--json"])
    assert "did you mean 'kserve'" in json.loads(unknown.stdout)["error"]
    assert not any(tmp_path.iterdir())
