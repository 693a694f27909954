"""One suite over every registered ONNX pass, on a real exported CNN (Conv + Gemm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from slipstream.artifact import Bundle
from slipstream.data.synthetic import example_inputs
from slipstream.passes import CATALOGUE, PassRun, load_pass, lookup
from slipstream.runtime import Engine
from tests.passes.helpers import run_pass, tree_bytes

ONNX_PASSES = sorted(name for name, spec in CATALOGUE.items() if spec.input_kind == "onnx")

# Options that make each pass do real work on the small CNN, where the default would be a no-op.
OPTIONS: dict[str, dict[str, object]] = {
    "weights.binarize": {"min_elements": 512},
    "quantize.static": {"num_samples": 32},
}


@pytest.fixture(scope="module")
def conformance_runs(
    cnn_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict[str, bytes], PassRun, PassRun]]:
    """Per pass: the input's bytes before, and two runs without a cache (for determinism)."""
    root = tmp_path_factory.mktemp("conformance")
    runs: dict[str, tuple[dict[str, bytes], PassRun, PassRun]] = {}
    for name in ONNX_PASSES:
        before = tree_bytes(cnn_bundle.path)
        first, _ = run_pass(cnn_bundle, name, root / f"{name}-1", OPTIONS.get(name), seed=7)
        second, _ = run_pass(cnn_bundle, name, root / f"{name}-2", OPTIONS.get(name), seed=7)
        runs[name] = (before, first, second)
    return runs


def test_the_catalogue_registers_every_onnx_pass() -> None:
    assert ONNX_PASSES == [
        "graph.optimize",
        "precision.fp16",
        "prune.magnitude",
        "prune.random",
        "quantize.dynamic",
        "quantize.static",
        "weights.binarize",
        "weights.int4",
    ]


@pytest.mark.parametrize("name", ONNX_PASSES)
def test_config_round_trips_through_json(name: str) -> None:
    instance = load_pass(lookup(name))
    config = instance.make_config(OPTIONS.get(name))
    again = type(config).model_validate_json(config.model_dump_json())
    assert again == config
    assert instance.config_hash(again) == instance.config_hash(config)
    for field_name, field in type(config).model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"


@pytest.mark.parametrize("name", ONNX_PASSES)
def test_input_bundle_is_untouched(name: str, conformance_runs: dict, cnn_bundle: Bundle) -> None:
    before, _, _ = conformance_runs[name]
    assert tree_bytes(cnn_bundle.path) == before
    Bundle.load(cnn_bundle.path)  # still verifies


@pytest.mark.parametrize("name", ONNX_PASSES)
def test_output_passes_the_onnx_checker(name: str, conformance_runs: dict) -> None:
    _, run, _ = conformance_runs[name]
    onnx.checker.check_model(onnx.load(str(run.bundle.model_path)), full_check=False)


@pytest.mark.parametrize("name", ONNX_PASSES)
def test_lineage_grows_by_exactly_one(name: str, conformance_runs: dict, cnn_bundle: Bundle) -> None:
    _, run, _ = conformance_runs[name]
    parent, child = cnn_bundle.manifest.lineage, Bundle.load(run.bundle.path).manifest.lineage
    assert child[:-1] == parent
    entry = child[-1]
    assert entry.step == lookup(name).step_name
    assert entry.input_sha256 == cnn_bundle.model_sha256
    assert entry.output_sha256 == run.bundle.model_sha256
    assert entry.config == load_pass(lookup(name)).make_config(OPTIONS.get(name)).model_dump(mode="json")
    assert name in run.bundle.manifest.resolved and name in run.bundle.manifest.metrics


@pytest.mark.parametrize("name", ONNX_PASSES)
def test_deterministic_under_a_seed(name: str, conformance_runs: dict) -> None:
    _, first, second = conformance_runs[name]
    assert first.bundle.model_path.read_bytes() == second.bundle.model_path.read_bytes()
    assert first.bundle.manifest.metrics == second.bundle.manifest.metrics


@pytest.mark.parametrize("name", ONNX_PASSES)
def test_output_runs_in_an_onnxruntime_session(name: str, conformance_runs: dict, cnn_bundle: Bundle) -> None:
    _, run, _ = conformance_runs[name]
    feeds = example_inputs(cnn_bundle.manifest.inputs, batch=5, seed=1)
    got = Engine(run.bundle).run(feeds)["logits"]
    want = Engine(cnn_bundle).run(feeds)["logits"]
    assert got.shape == want.shape == (5, 10)
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    assert run.bundle.manifest.inputs == cnn_bundle.manifest.inputs
    assert run.bundle.manifest.outputs == cnn_bundle.manifest.outputs


@pytest.mark.parametrize("name", ONNX_PASSES)
def test_records_sizes_and_fidelity(name: str, conformance_runs: dict) -> None:
    _, run, _ = conformance_runs[name]
    metrics = run.bundle.manifest.metrics[name]
    assert isinstance(metrics, dict)
    assert metrics["size_bytes_out"] == run.bundle.model_path.stat().st_size
    fidelity = metrics["fidelity"]
    assert isinstance(fidelity, dict)
    assert set(fidelity["outputs"]) == {"logits"}  # type: ignore[arg-type]


def test_a_pass_run_writes_only_its_output(cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in run.bundle.path.iterdir()) == ["manifest.json", "model.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_PASSES)
def test_every_pass_runs_on_a_transformer_export(name: str, transformer_bundle: Bundle, tmp_path: Path) -> None:
    """The same passes on a dynamo-exported nn.TransformerEncoder (dynamic batch and sequence)."""
    run, _ = run_pass(transformer_bundle, name, tmp_path / "o", {"num_samples": 16} if "static" in name else None)
    onnx.checker.check_model(onnx.load(str(run.bundle.model_path)), full_check=False)
    ids = np.random.default_rng(0).integers(0, 50, size=(3, 13)).astype(np.int64)
    got = Engine(run.bundle).run({"input_ids": ids})["pooled"]
    want = Engine(transformer_bundle).run({"input_ids": ids})["pooled"]
    assert got.shape == want.shape == (3, 32)
    assert np.isfinite(got).all()
