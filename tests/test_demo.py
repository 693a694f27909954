"""The main job in its fast mode: train, convert, build, serve, attack and shut down, for real."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from slipstream.artifact import Bundle
from slipstream.cli import app


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--fast", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for heading in ("1 · train", "2 · convert", "3 · build", "4 · serve", "5 · traffic", "6 · what the server saw"):
        assert heading in out
    assert "a copy with one flipped byte is refused" in out
    assert "server errors (5xx): 0" in out
    assert re.search(r"malformed\s+│\s+7 │ 400×7", out)
    assert re.search(r"unauthenticated\s+│\s+5 │ 401×5", out)
    assert re.search(r"over the rate limit\s+│\s+300 │ 200×\d+, 429×\d+", out)
    # The monitor: quiet on normal traffic, then drift and the accuracy drop once the labels came back.
    assert re.search(r"alerts firing\s+│ none\s+│ input_drift", out)
    assert "accuracy_drop: quality.accuracy_drop" in out
    assert "'dropped': 0" in out
    winner = Bundle.load(tmp_path / "build" / "winner")
    assert winner.manifest.lineage[-1].step == "build.select@1"
    assert (tmp_path / "build" / "report.html").is_file()
    assert not (tmp_path / "tampered").exists()
