"""`slipstream export --to edge`: the .ort file matches the bundle, its operator config, and the runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from slipstream.artifact import Bundle
from slipstream.deploy import DeployOptions, export
from slipstream.deploy.edge import parity_feeds
from slipstream.errors import ExportRefusedError, SlipstreamError
from slipstream.importers import import_onnx
from slipstream.runtime import Engine


@pytest.fixture(scope="module")
def edge_export(mlp_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "mlp-edge"
    export(mlp_bundle_dir, "edge", out, DeployOptions(operator_set="mlp"))
    return out


@pytest.mark.slow
def test_the_ort_file_matches_the_bundle(edge_export: Path, mlp_bundle_dir: Path) -> None:
    bundle = Bundle.load(mlp_bundle_dir)
    feeds = parity_feeds(bundle, seed=7)  # other inputs than the export's own parity check
    session = ort.InferenceSession(str(edge_export / "mlp.ort"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], feeds)
    want = Engine(bundle).run(feeds)["probabilities"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    info = json.loads((edge_export / "edge.json").read_text())
    assert info["sizes"]["ort_bytes"] == (edge_export / "mlp.ort").stat().st_size
    assert info["target"]["providers"] == ["CPUExecutionProvider"]
    assert info["parity"]["max_abs_error"]["probabilities"] <= 1e-4


def test_the_operator_config_lists_what_the_model_uses(edge_export: Path) -> None:
    lines = [x for x in (edge_export / "required_operators.config").read_text().splitlines() if not x.startswith("#")]
    ops = {(line.split(";")[0], op) for line in lines for op in line.split(";")[2].split(",")}
    # Gemm → Relu → Gemm → Softmax, with the first Gemm and the Relu fused by the 'extended' optimizations.
    assert ops == {("com.microsoft", "FusedGemm"), ("ai.onnx", "Gemm"), ("ai.onnx", "Softmax")}
    assert json.loads((edge_export / "edge.json").read_text())["sizes"]["operator_types"] == 3


@pytest.mark.slow
def test_the_runner_needs_only_numpy_and_onnxruntime(edge_export: Path, mlp_bundle_dir: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(mlp_bundle_dir)
    feeds = parity_feeds(bundle, seed=3)
    np.savez(tmp_path / "in.npz", **feeds)
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can lend it slipstream.
    done = subprocess.run(
        [sys.executable, "-I", "-c", "import runpy, sys; sys.modules['slipstream'] = None; sys.argv = sys.argv[1:]; "
         "runpy.run_path(sys.argv[0], run_name='__main__')", str(edge_export / "run.py"), str(tmp_path / "in.npz"),
         "--out", str(tmp_path / "out.npz")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npz")["probabilities"], Engine(bundle).run(feeds)["probabilities"], atol=1e-5
    )


@pytest.mark.slow
def test_the_runner_refuses_another_architecture(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    other = "aarch64" if os.uname().machine == "x86_64" else "x86_64"
    export(mlp_bundle_dir, "edge", tmp_path / "e", DeployOptions(architecture=other))  # type: ignore[arg-type]
    done = subprocess.run([sys.executable, str(tmp_path / "e" / "run.py")], capture_output=True, text=True)
    assert done.returncode != 0
    assert f"exported for {other}" in done.stderr


def test_an_operator_outside_the_named_set_is_refused_by_name(scorer_onnx: Path, tmp_path: Path) -> None:
    bundle = import_onnx(scorer_onnx, tmp_path / "scorer").path
    with pytest.raises(ExportRefusedError, match=r"ai\.onnx:ReduceSum") as caught:
        export(bundle, "edge", tmp_path / "out", DeployOptions(operator_set="mlp"))
    assert "'mlp'" in caught.value.reasons[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportRefusedError, match="unknown operator set 'tiny'"):
        export(bundle, "edge", tmp_path / "out", DeployOptions(operator_set="tiny"))
    export(bundle, "edge", tmp_path / "out", DeployOptions(operator_set="transformer"))  # ReduceSum is in it


def test_a_repository_is_refused(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(mlp_bundle_dir, tmp_path / "repo" / "mlp" / "1")
    with pytest.raises(ExportRefusedError, match="one model"):
        export(tmp_path / "repo", "edge", tmp_path / "out")


def test_parity_on_the_callers_data(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    np.savez(tmp_path / "real.npz", pixels=rng.uniform(0, 1, (37, 8)).astype(np.float32))
    export(mlp_bundle_dir, "edge", tmp_path / "e", DeployOptions(parity_data=tmp_path / "real.npz"))
    parity = json.loads((tmp_path / "e" / "edge.json").read_text())["parity"]
    assert (parity["inputs"], parity["rows"]) == ("data", 37)
    np.savez(tmp_path / "wrong.npz", image=np.zeros((2, 8), np.float32))
    with pytest.raises(SlipstreamError, match="pixels"):
        export(mlp_bundle_dir, "edge", tmp_path / "f", DeployOptions(parity_data=tmp_path / "wrong.npz"))
    assert not (tmp_path / "f").exists()
