"""export()'s mechanics, whatever the target: verify first, refuse before writing, write atomically."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

from slipstream.deploy import DEPLOYERS, DeployOptions, DeploySource, export
from slipstream.deploy.base import Deployer
from slipstream.errors import BundleExistsError, ConfigError, IntegrityError


class HalfWriter:
    """A target that writes one file, then fails the way a crash or a Ctrl-C would."""

    name: ClassVar[str] = "half"

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def refusals(self, source: DeploySource, options: DeployOptions) -> list[str]:
        return []

    def write(self, source: DeploySource, options: DeployOptions, into: Path) -> list[Path]:
        (into / "first.txt").write_text("written before the failure")
        raise self.failure


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_no_output(mlp_bundle_dir: Path, tmp_path: Path, failure: BaseException) -> None:
    deployers: dict[str, Deployer] = {"half": HalfWriter(failure)}
    with pytest.raises(type(failure)):
        export(mlp_bundle_dir, "half", tmp_path / "out", deployers=deployers)
    assert list(tmp_path.iterdir()) == []  # neither out nor the temporary directory


@pytest.mark.slow
def test_a_killed_export_leaves_no_output(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    """SIGKILL mid-write: no cleanup runs, yet `out` never exists (only the hidden temporary sibling)."""
    script = f"""
import os, signal
from pathlib import Path
from slipstream.deploy import export
from slipstream.deploy import edge

class Killed(edge.EdgeDeployer):
    def write(self, source, options, into):
        (into / "first.txt").write_text("x")
        os.kill(os.getpid(), signal.SIGKILL)

export(Path({str(mlp_bundle_dir)!r}), "edge", Path({str(tmp_path / "out")!r}), deployers={{"edge": Killed()}})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert done.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    assert all(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_unknown_target_suggests_the_nearest(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'triton'") as caught:
        export(mlp_bundle_dir, "tritn", tmp_path / "out")
    assert caught.value.field == "to"
    assert all(name in str(caught.value) for name in DEPLOYERS)


def test_a_damaged_bundle_is_refused_before_any_target_runs(bundle_copy: Path, tmp_path: Path) -> None:
    with (bundle_copy / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError):
        export(bundle_copy, "triton", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_unless_overwrite(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(BundleExistsError):
        export(mlp_bundle_dir, "triton", out)
    assert (out / "mine.txt").read_text() == "keep"
    export(mlp_bundle_dir, "triton", out, DeployOptions(overwrite=True))
    assert not (out / "mine.txt").exists() and (out / "mlp" / "config.pbtxt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old copy was removed


def test_source_layouts(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    one = DeploySource.load(mlp_bundle_dir)
    assert not one.repository and [(b.name, b.version) for b in one.bundles] == [("mlp", "1")]
    repo = tmp_path / "repo"
    shutil.copytree(mlp_bundle_dir, repo / "a" / "2")
    shutil.copytree(mlp_bundle_dir, repo / "a" / ".3.tmp")  # being published: skipped, as serve skips it
    many = DeploySource.load(repo)
    assert many.repository and [(b.name, b.version) for b in many.bundles] == [("a", "2")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a bundle"):
        DeploySource.load(tmp_path / "empty")


def test_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="go together"):
        DeployOptions(min_replicas=1)
    with pytest.raises(ValidationError, match="above max_replicas"):
        DeployOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        DeployOptions(replicaz=2)  # type: ignore[call-arg]
    assert DeployOptions(min_replicas=0, max_replicas=2).autoscaling


def test_an_output_overlapping_the_source_is_refused(bundle_copy: Path) -> None:
    for out in (bundle_copy, bundle_copy / "inside", bundle_copy.parent):
        with pytest.raises(ConfigError, match="overlaps the source"):
            export(bundle_copy, "triton", out, DeployOptions(overwrite=True))
    assert (bundle_copy / "manifest.json").is_file()
