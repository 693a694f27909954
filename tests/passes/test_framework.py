"""The pass framework: catalogue, recipe order, cache, the optimize API and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import slipstream
from slipstream.artifact import Bundle
from slipstream.errors import BundleExistsError, ConfigError, DataError, MissingDependencyError, PassError
from slipstream.importers import import_onnx
from slipstream.passes import (
    CATALOGUE,
    PassCache,
    PassSpec,
    PassWarning,
    check_order,
    load_pass,
    lookup,
    parse_pass_ref,
)
from slipstream.passes.cache import default_cache_dir
from tests.passes.helpers import run_pass, tree_bytes

SLIPSTREAM = Path(sys.executable).with_name("slipstream")

# Catalogue entries for the torch passes, as the PyTorch importer's work will register them; here they
# only carry kinds, which is all the order check reads.
PRUNE_STRUCTURED = PassSpec("prune.structured", 1, "x", "X", "torch", "torch", "", extra="torch")
EXPORT = PassSpec("export.onnx", 1, "x", "X", "torch", "onnx", "", extra="torch")


def test_lookup_accepts_name_and_name_at_version() -> None:
    assert lookup("quantize.dynamic") is CATALOGUE["quantize.dynamic"]
    assert lookup("quantize.dynamic@1").step_name == "quantize.dynamic@1"


def test_unknown_pass_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        lookup("quantize.dinamic")
    assert "Unknown pass 'quantize.dinamic'" in info.value.message
    for name in ("quantize.dynamic@1", "weights.int4@1", "prune.magnitude@1"):
        assert name in info.value.message


def test_wrong_version_is_refused() -> None:
    with pytest.raises(ConfigError, match="has version 1 in this slipstream; the recipe asks for @7"):
        lookup("quantize.static@7")


def test_missing_extra_names_the_extra() -> None:
    spec = PassSpec(
        "prune.structured",
        1,
        "slipstream.passes.prune",
        "PruneMagnitude",
        "torch",
        "torch",
        "",
        extra="torch",
        requires=("a_package_that_is_not_installed",),
    )
    with pytest.raises(MissingDependencyError) as info:
        load_pass(spec)
    assert info.value.extra == "torch"
    assert "pip install 'slipstream[torch]'" in str(info.value)
    assert "prune.structured@1" in info.value.message


def test_torch_pass_after_export_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ConfigError) as info:
        check_order([EXPORT, CATALOGUE["quantize.static"], PRUNE_STRUCTURED], start="torch")
    assert "prune.structured works on a torch model; put it before export" in info.value.message


def test_onnx_pass_before_export_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"quantize\.static works on an ONNX model; put it after export"):
        check_order([CATALOGUE["quantize.static"], EXPORT], start="torch")


def test_well_ordered_recipes_pass() -> None:
    check_order([PRUNE_STRUCTURED, EXPORT, CATALOGUE["quantize.static"]], start="torch")
    check_order([CATALOGUE["graph.optimize"], CATALOGUE["quantize.dynamic"]], start="onnx")


def test_a_torch_pass_on_a_bundle_is_rejected_before_any_work(cnn_bundle: Bundle, tmp_path: Path) -> None:
    catalogue = MappingProxyType({**CATALOGUE, "prune.structured": PRUNE_STRUCTURED})
    spec = lookup("prune.structured", catalogue)
    with pytest.raises(ConfigError, match="put it before export"):
        check_order([CATALOGUE["quantize.dynamic"], spec], start="onnx")


def test_parse_pass_ref() -> None:
    assert parse_pass_ref("quantize.static") == ("quantize.static", {})
    name, options = parse_pass_ref("quantize.static:calibration=entropy,per_channel=false,op_types=[Conv,MatMul]")
    assert name == "quantize.static"
    assert options == {"calibration": "entropy", "per_channel": False, "op_types": ["Conv", "MatMul"]}
    assert parse_pass_ref("prune.magnitude:sparsity=0.25")[1] == {"sparsity": 0.25}
    with pytest.raises(ConfigError, match="Expected key=value"):
        parse_pass_ref("prune.magnitude:sparsity")


def test_bad_options_are_refused_before_any_work(cnn_bundle: Bundle, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        slipstream.optimize(
            cnn_bundle, ["graph.optimize", "prune.magnitude:sparsity=1.5", "quantize.static:calib=x"], out, cache=False
        )
    assert "sparsity" in info.value.message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_optimize_chains_passes_and_grows_lineage_by_one_each(cnn_bundle: Bundle, tmp_path: Path) -> None:
    before = tree_bytes(cnn_bundle.path)
    events: list[tuple[int, str, bool]] = []
    with pytest.warns(PassWarning, match="GENERATED data"):
        out = slipstream.optimize(
            cnn_bundle.path,
            ["prune.magnitude:op_types=[Gemm]", ("quantize.static", {"num_samples": 16}), "graph.optimize"],
            tmp_path / "out",
            cache=False,
            progress=lambda e: events.append((e.index, e.step, e.run is not None)),
        )
    assert tree_bytes(cnn_bundle.path) == before
    steps = [e.step for e in Bundle.load(out.path).manifest.lineage]
    assert steps == ["import.onnx@1", "prune.magnitude@1", "quantize.static@1", "graph.optimize@1"]
    assert events == [
        (0, "prune.magnitude@1", False),
        (0, "prune.magnitude@1", True),
        (1, "quantize.static@1", False),
        (1, "quantize.static@1", True),
        (2, "graph.optimize@1", False),
        (2, "graph.optimize@1", True),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # intermediates are gone
    with pytest.raises(BundleExistsError):
        slipstream.optimize(cnn_bundle, ["graph.optimize"], tmp_path / "out", cache=False)


def test_cache_hit_returns_the_same_model(cnn_bundle: Bundle, tmp_path: Path) -> None:
    cache = PassCache(tmp_path / "cache")
    first, _ = run_pass(cnn_bundle, "prune.random", tmp_path / "a", {"sparsity": 0.3}, cache=cache)
    second, _ = run_pass(cnn_bundle, "prune.random", tmp_path / "b", {"sparsity": 0.3}, cache=cache)
    third, _ = run_pass(cnn_bundle, "prune.random", tmp_path / "c", {"sparsity": 0.4}, cache=cache)
    assert (first.cache_hit, second.cache_hit, third.cache_hit) == (False, True, False)
    assert first.bundle.model_sha256 == second.bundle.model_sha256 != third.bundle.model_sha256
    assert second.bundle.manifest.resolved["prune.random"]["cache"] == "hit"  # type: ignore[index]
    assert second.bundle.manifest.metrics == first.bundle.manifest.metrics
    assert len(second.bundle.manifest.lineage) == len(cnn_bundle.manifest.lineage) + 1


def test_cache_keeps_pass_warnings(cnn_bundle: Bundle, tmp_path: Path) -> None:
    cache = PassCache(tmp_path / "cache")
    _, first = run_pass(cnn_bundle, "quantize.dynamic", tmp_path / "a", cache=cache)
    run, again = run_pass(cnn_bundle, "quantize.dynamic", tmp_path / "b", cache=cache)
    assert run.cache_hit
    assert first == again
    assert any("ConvInteger" in w for w in again)


def test_a_corrupted_cache_entry_is_never_returned(cnn_bundle: Bundle, tmp_path: Path) -> None:
    cache = PassCache(tmp_path / "cache")
    first, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "a", cache=cache)
    entries = list((tmp_path / "cache").glob("*/*/model.onnx"))
    assert len(entries) == 1
    # Replace the cached model with a valid but different one: only the digest check can catch it.
    model = onnx.load(str(entries[0]))
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    onnx.save_model(model, str(entries[0]))
    again, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "b", cache=cache)
    assert not again.cache_hit
    assert again.bundle.model_sha256 == first.bundle.model_sha256
    third, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "c", cache=cache)
    assert third.cache_hit  # the entry was rewritten


def test_default_cache_dir_follows_the_environment(tmp_path: Path) -> None:
    assert default_cache_dir({"SLIPSTREAM_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "slipstream" / "passes"
    assert default_cache_dir({}) == Path.home() / ".cache" / "slipstream" / "passes"


def test_bad_calibration_data_is_a_data_error(mlp_bundle: Bundle, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((4, 2, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"input 'pixels' must have shape \[batch, 8\]; got \[4, 2, 8\]"):
        run_pass(mlp_bundle, "quantize.static", tmp_path / "o", {"data": str(bad)})
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"missing \['pixels'\]; unexpected \['images'\]"):
        run_pass(mlp_bundle, "quantize.static", tmp_path / "o", {"data": str(wrong)})


def test_a_failing_tool_becomes_a_pass_error_naming_the_pass(tmp_path: Path) -> None:
    # A valid ONNX graph with an operator onnxruntime has no kernel for.
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom")
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / "custom.onnx"))
    bundle = import_onnx(tmp_path / "custom.onnx", tmp_path / "b")
    with pytest.raises(PassError) as info:
        run_pass(bundle, "graph.optimize", tmp_path / "o")
    assert info.value.pass_name == "graph.optimize"
    assert "graph.optimize@1 failed on 'custom'" in info.value.message
    assert not (tmp_path / "o").exists()


def test_cli_optimize_json_and_list(cnn_bundle: Bundle, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(SLIPSTREAM),
            "optimize",
            str(cnn_bundle.path),
            "-o",
            str(tmp_path / "o"),
            "--pass",
            "prune.magnitude:sparsity=0.5",
            "--pass",
            "precision.fp16",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    fidelity = report["manifest"]["metrics"]["precision.fp16"]["fidelity"]
    assert fidelity["data"].startswith("generated")
    assert [s["step"] for s in report["steps"]] == ["prune.magnitude@1", "precision.fp16@1"]
    assert report["manifest"]["metrics"]["prune.magnitude"]["sparsity"] == 0.5
    listed = subprocess.run([str(SLIPSTREAM), "optimize", "--list", "--json"], capture_output=True, text=True)
    assert {p["name"] for p in json.loads(listed.stdout)["passes"]} >= {"quantize.static@1", "weights.binarize@1"}


def test_cli_reports_errors_and_warnings(cnn_bundle: Bundle, tmp_path: Path) -> None:
    bad = subprocess.run(
        [str(SLIPSTREAM), "optimize", str(cnn_bundle.path), "-o", str(tmp_path / "o"), "--pass", "prune.foo"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "Unknown pass 'prune.foo'" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run(
        [
            str(SLIPSTREAM),
            "optimize",
            str(cnn_bundle.path),
            "-o",
            str(tmp_path / "q"),
            "--pass",
            "quantize.dynamic",
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "ConvInteger" in ok.stderr and "SLOWER" in ok.stderr
    assert "wrote bundle" in ok.stdout


def test_the_seed_is_part_of_the_cache_key_and_recorded(cnn_bundle: Bundle, tmp_path: Path) -> None:
    cache = PassCache(tmp_path / "cache")
    options = {"num_samples": 8}
    a, _ = run_pass(cnn_bundle, "quantize.static", tmp_path / "a", options, cache=cache, seed=1)
    b, _ = run_pass(cnn_bundle, "quantize.static", tmp_path / "b", options, cache=cache, seed=2)
    c, _ = run_pass(cnn_bundle, "quantize.static", tmp_path / "c", options, cache=cache, seed=1)
    assert (a.cache_hit, b.cache_hit, c.cache_hit) == (False, False, True)
    assert a.bundle.model_sha256 != b.bundle.model_sha256  # other generated calibration data
    assert b.bundle.manifest.resolved["quantize.static"]["seed"] == 2  # type: ignore[index]


def test_an_existing_output_is_refused_before_any_work(cnn_bundle: Bundle, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    cache = PassCache(tmp_path / "cache")
    with pytest.raises(BundleExistsError, match="already exists"):
        run_pass(cnn_bundle, "prune.magnitude", tmp_path / "taken", cache=cache)
    assert not (tmp_path / "cache").exists()  # nothing was computed
    run, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "taken", overwrite=True)
    assert Bundle.load(run.bundle.path).manifest.lineage[-1].step == "prune.magnitude@1"


def test_cli_data_option(cnn_bundle: Bundle, calibration_npz: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(SLIPSTREAM), "optimize", str(cnn_bundle.path), "-o", str(tmp_path / "o"), "--pass", "quantize.static",
         "--data", str(calibration_npz), "--no-cache", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["steps"][0]["warnings"] == []
    resolved = report["manifest"]["resolved"]["quantize.static"]
    assert resolved["calibration_data"] == f"recipe data file {calibration_npz}"


def test_recipe_data_drives_fidelity_and_calibration(cnn_bundle: Bundle, calibration_npz: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PassWarning)  # no "GENERATED data" warning may come
        out = slipstream.optimize(
            cnn_bundle,
            ["prune.magnitude", "quantize.static:num_samples=64"],
            tmp_path / "o",
            cache=False,
            data=calibration_npz,
        )
    resolved = out.manifest.resolved["quantize.static"]
    assert isinstance(resolved, dict)
    assert resolved["calibration_data"] == f"recipe data file {calibration_npz}"
    assert "calibration_note" not in resolved
    for name in ("quantize.static", "prune.magnitude"):
        fidelity = out.manifest.metrics[name]["fidelity"]  # type: ignore[index,call-overload]
        assert fidelity["data"] == f"file {calibration_npz}" and fidelity["batch"] == 64


def test_bad_recipe_data_is_refused_before_any_work(cnn_bundle: Bundle, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 1, 8, 8), dtype=np.float32))
    with pytest.raises(DataError, match="expected arrays named \\['pixels'\\]"):
        slipstream.optimize(cnn_bundle, ["prune.magnitude"], tmp_path / "o", cache=False, data=bad)
    assert not (tmp_path / "o").exists()


def test_the_data_file_is_part_of_the_cache_key(cnn_bundle: Bundle, calibration_npz: Path, tmp_path: Path) -> None:
    cache = PassCache(tmp_path / "cache")
    other = tmp_path / "other.npz"
    np.savez(other, pixels=np.ones((16, 1, 8, 8), dtype=np.float32))
    a, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "a", cache=cache, data=calibration_npz)
    b, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "b", cache=cache, data=other)
    c, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "c", cache=cache, data=calibration_npz)
    assert (a.cache_hit, b.cache_hit, c.cache_hit) == (False, False, True)
    assert a.bundle.manifest.metrics != b.bundle.manifest.metrics  # fidelity measured on each file


def test_an_edited_cache_manifest_is_never_returned(cnn_bundle: Bundle, tmp_path: Path) -> None:
    cache = PassCache(tmp_path / "cache")
    run_pass(cnn_bundle, "prune.magnitude", tmp_path / "a", {"sparsity": 0.5}, cache=cache)
    (manifest,) = (tmp_path / "cache").glob("*/*/manifest.json")
    text = manifest.read_text()
    assert '"sparsity": 0.5' in text
    manifest.write_text(text.replace('"sparsity": 0.5', '"sparsity": 0.9'))
    again, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "b", {"sparsity": 0.5}, cache=cache)
    assert not again.cache_hit
    assert again.bundle.manifest.metrics["prune.magnitude"]["sparsity"] == 0.5  # type: ignore[index,call-overload]
