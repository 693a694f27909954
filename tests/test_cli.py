from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from typer.testing import CliRunner

from slipstream.cli import app
from tests.onnx_models import build_trained_digits_mlp

runner = CliRunner()
SLIPSTREAM = Path(sys.executable).with_name("slipstream")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_console_script_lists_the_commands() -> None:
    out = subprocess.run([str(SLIPSTREAM), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("convert", "inspect", "bench", "demo"):
        assert command in out


def test_convert_then_inspect_json_then_tamper(mlp_onnx: Path, tmp_path: Path) -> None:
    """The issue's walk-through, through the real console script."""
    b = tmp_path / "b"
    subprocess.run([str(SLIPSTREAM), "convert", str(mlp_onnx), "-o", str(b)], check=True, capture_output=True)
    shown = subprocess.run([str(SLIPSTREAM), "inspect", str(b), "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(shown.stdout)
    assert summary["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["batch", 8], "value_range": None}]
    assert summary["outputs"][0]["name"] == "probabilities"
    assert summary["op_histogram"] == {"Gemm": 2, "Relu": 1, "Softmax": 1}
    assert summary["parameter_count"] == 8 * 16 + 16 + 16 * 4 + 4

    _flip_byte(b / "model.onnx")
    broken = subprocess.run([str(SLIPSTREAM), "inspect", str(b)], capture_output=True, text=True)
    assert broken.returncode == 1
    assert "integrity check" in broken.stderr and "model.onnx" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_convert_json_and_refusal_to_overwrite(mlp_onnx: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    first = runner.invoke(app, ["convert", str(mlp_onnx), "-o", str(b), "--name", "digits", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["name"] == "digits"
    again = runner.invoke(app, ["convert", str(mlp_onnx), "-o", str(b), "--json"])
    assert again.exit_code == 1
    err = json.loads(again.stdout)
    assert err["type"] == "BundleExistsError" and "--overwrite" in err["hint"]
    assert runner.invoke(app, ["convert", str(mlp_onnx), "-o", str(b), "--overwrite"]).exit_code == 0


def test_inspect_human_output(mlp_bundle_dir: Path) -> None:
    result = runner.invoke(app, ["inspect", str(mlp_bundle_dir)])
    assert result.exit_code == 0, result.output
    for text in ("pixels", "[batch, 8]", "Gemm", "fc0.weight", "import.onnx@1"):
        assert text in result.stdout


def test_bench_json_reports_percentiles_and_throughput(mlp_bundle_dir: Path) -> None:
    result = runner.invoke(
        app, ["bench", str(mlp_bundle_dir), "--batch", "1,4", "--threads", "1", "--max-time", "0.1", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["batch"] for r in report["results"]] == [1, 4]
    for r in report["results"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_sps"] > 0
    assert report["engine"]["providers"] == ["CPUExecutionProvider"]


def test_bench_human_output_and_bad_options(mlp_bundle_dir: Path) -> None:
    ok = runner.invoke(app, ["bench", str(mlp_bundle_dir), "--batch", "2", "--threads", "1", "--max-time", "0.05"])
    assert ok.exit_code == 0, ok.output
    assert "p99 ms" in ok.stdout
    bad = runner.invoke(app, ["bench", str(mlp_bundle_dir), "--batch", "one"])
    assert bad.exit_code == 2
    assert "comma-separated integers" in bad.output
    tpu = runner.invoke(app, ["bench", str(mlp_bundle_dir), "--target", "tpu"])
    assert tpu.exit_code == 1 and "Unknown target" in tpu.stderr


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr and "slipstream convert" in result.stderr


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("slipstream ")


def test_build_in_a_log_prints_a_line_per_step_then_the_table(tmp_path: Path) -> None:
    """Not on a terminal (CI, `> build.log`): progress as timed plain lines on stderr, the result on stdout."""
    model, x, y = build_trained_digits_mlp()
    onnx.save_model(model, str(tmp_path / "digits.onnx"))
    np.savez(tmp_path / "eval.npz", pixels=x[:200], labels=y[:200])
    recipe = {
        "name": "digits",
        "model": str(tmp_path / "digits.onnx"),
        "data": {"eval": str(tmp_path / "eval.npz")},
        "budget": {"max_accuracy_drop": 0.02},
        "batch_size": 32,
        "bench_time_s": 0.2,
        "output": str(tmp_path / "out"),
        "candidates": [{"name": "optimized", "passes": ["graph.optimize"]}],
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    done = subprocess.run([str(SLIPSTREAM), "build", str(tmp_path / "recipe.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    steps = [line.split("] ", 1)[1] for line in lines if line.startswith("[") and " s] " in line]
    assert steps[:3] == ["import", "baseline", "candidate 1/1 optimized"], done.stderr
    assert "tune" in " ".join(steps) and "report" in " ".join(steps)
    assert "optimized" in done.stdout and "build took" in done.stdout
    assert (tmp_path / "out" / "winner" / "manifest.json").is_file()


def test_build_progress_lines_name_each_step_and_its_place() -> None:
    from slipstream.build.search import BuildEvent
    from slipstream.cli.build import _describe

    assert _describe(BuildEvent("import")) == "import"
    assert _describe(BuildEvent("baseline", "baseline")) == "baseline"
    assert _describe(BuildEvent("candidate", "int8", 2, 5, "fp16 (first pass 1.10×)")) == (
        "candidate 3/5 int8 · best so far: fp16 (first pass 1.10×)"
    )
    assert _describe(BuildEvent("sensitivity", "/layer.0/MatMul", 0, 48)) == "sensitivity 1/48 /layer.0/MatMul"
