from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from slipstream.artifact import Bundle
from slipstream.cli import app


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for heading in ("build a model", "convert it", "inspect it", "tampering is caught", "benchmark it"):
        assert heading in result.stdout
    assert "refused a copy with one flipped byte" in result.stdout
    bundle = Bundle.load(tmp_path / "mlp-bundle")
    assert bundle.manifest.name == "demo-mlp"
    assert not (tmp_path / "mlp-bundle-tampered").exists()
