"""OpenVINO as a second engine: parity with onnxruntime on real exported models, the recorded choice and the
CPU features it needs, the warning (or refusal) on a CPU without them, and a build that measures it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from slipstream.artifact import Bundle
from slipstream.build.ladder import auto_candidates, engine_skip
from slipstream.build.recipe import Candidate, parse_recipe
from slipstream.build.search import run_build
from slipstream.errors import EngineError, InputError
from slipstream.evaluate.bench import BenchSettings, bench
from slipstream.runtime import Engine, Target, engine_choice, open_engine
from slipstream.runtime.choice import CPU_FEATURES, engine_key, make_choice
from slipstream.runtime.openvino_engine import OpenVinoEngine
from slipstream.runtime.targets import cpu_flags
from tests.passes.helpers import run_pass


@pytest.fixture(scope="module")
def ov_cnn(cnn_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    run, _ = run_pass(cnn_bundle, "engine.openvino", tmp_path_factory.mktemp("ov-cnn") / "b", {"precision": "f32"})
    return run.bundle


def test_openvino_matches_onnxruntime_at_f32_on_an_exported_cnn(
    ov_cnn: Bundle, cnn_bundle: Bundle, digits: tuple[np.ndarray, ...]
) -> None:
    x = digits[2][:200]
    engine = open_engine(ov_cnn, Target(intra_op_threads=1))
    assert isinstance(engine, OpenVinoEngine)
    got = engine.run({"pixels": x})
    want = Engine(cnn_bundle, Target(intra_op_threads=1)).run({"pixels": x})
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)
    info = engine.resolved()
    assert (info.engine, info.precision, info.intra_op_threads, info.streams) == ("openvino", "fp32", 1, 1)
    # The same checks as onnxruntime's engine, with the same messages.
    with pytest.raises(InputError, match=r"must have shape \[batch, 1, 8, 8\]"):
        engine.run({"pixels": x[:, :, :4]})
    with pytest.raises(InputError, match="do not exist"):
        engine.run({"pixels": x}, outputs=["nope"])


def test_openvino_matches_onnxruntime_on_an_exported_transformer(transformer_bundle: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(transformer_bundle, "engine.openvino", tmp_path / "b")
    ids = np.random.default_rng(0).integers(0, 50, size=(4, 11))
    got = open_engine(run.bundle, Target(intra_op_threads=1)).run({"input_ids": ids})
    want = Engine(transformer_bundle, Target(intra_op_threads=1)).run({"input_ids": ids})
    np.testing.assert_allclose(got["pooled"], want["pooled"], rtol=1e-3, atol=1e-4)


def test_the_step_records_the_choice_and_this_cpus_features(ov_cnn: Bundle, cnn_bundle: Bundle) -> None:
    choice = engine_choice(ov_cnn.manifest)
    assert (choice.engine, choice.precision, choice.inference_precision, choice.needs_any) == (
        "openvino", "fp32", "f32", ()
    )  # fmt: skip
    flags = cpu_flags()
    assert choice.cpu_features == {f: f in flags for f in CPU_FEATURES}
    assert {"amx_bf16", "avx512_bf16", "avx512_vnni"} <= set(choice.cpu_features)
    # Same model bytes, another engine: a measurement cache must not mistake one for the other.
    assert ov_cnn.model_sha256 == cnn_bundle.model_sha256
    assert engine_key(ov_cnn.model_sha256, ov_cnn.manifest) != engine_key(cnn_bundle.model_sha256, cnn_bundle.manifest)
    assert engine_choice(cnn_bundle.manifest).engine == "onnxruntime"
    # bench reports the engine it timed.
    report = bench(
        lambda: open_engine(ov_cnn, Target(intra_op_threads=1)), BenchSettings(batch_sizes=(4,), max_time_s=0.2)
    )
    assert report.engine.engine == "openvino"


def test_a_quantized_model_runs_as_int8_and_needs_an_int8_dot_product(ov_cnn: Bundle) -> None:
    entry = ov_cnn.manifest.lineage[-1].model_copy(update={"step": "quantize.nncf@1"})
    quantized = ov_cnn.manifest.model_copy(update={"lineage": (*ov_cnn.manifest.lineage, entry)})
    choice = make_choice(quantized, "openvino", "f32")
    assert (choice.precision, choice.needs_any) == ("int8", ("amx_int8", "avx512_vnni", "avx_vnni"))
    assert make_choice(quantized, "onnxruntime").needs_any == ()  # onnxruntime checks VNNI itself (int8_fusion)


def test_a_cpu_without_the_features_gets_the_measured_consequence_or_a_refusal(
    cnn_bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, _ = run_pass(cnn_bundle, "engine.openvino", tmp_path / "b", {"precision": "bf16"})
    choice = engine_choice(run.bundle.manifest)
    assert (choice.precision, choice.inference_precision) == ("bf16", "bf16")
    assert choice.needs_any == ("amx_bf16", "avx512_bf16")
    # As if built on a Xeon with AVX512-BF16 (the bundle travels; the choice says where it was measured).
    xeon = {**choice.cpu_features, "avx512_bf16": True}
    entry = {**run.bundle.manifest.resolved["engine.openvino"], "cpu_features": xeon}  # type: ignore[dict-item]
    manifest = run.bundle.manifest.model_copy(update={"resolved": {**run.bundle.manifest.resolved, "engine": entry}})
    built_there = Bundle(run.bundle.path, manifest)
    avx2_only = frozenset({"avx", "avx2", "fma"})
    # Measured on a CPU without the features too: its numbers are already those of such a CPU, no warning.
    assert not any("needs one of" in w for w in open_engine(run.bundle, flags=avx2_only).resolved().warnings)
    with caplog.at_level(logging.WARNING, logger="slipstream.runtime.open"):
        engine = open_engine(built_there, Target(intra_op_threads=1), flags=avx2_only)
    text = engine.resolved().warnings[0]
    assert "needs one of avx512_bf16" in text and "runs the model at f32" in text
    assert "22 ms at bf16, 80 ms at f32" in text  # the measured consequence
    assert text in caplog.text
    with pytest.raises(EngineError, match="needs one of avx512_bf16") as info:
        open_engine(built_there, Target(intra_op_threads=1, missing_cpu_features="refuse"), flags=avx2_only)
    assert info.value.hint is not None and "Rebuild" in info.value.hint
    with_bf16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert not any("needs one of" in w for w in open_engine(built_there, flags=with_bf16).resolved().warnings)
    # Never silent: where OpenVINO compiled something else than the bf16 asked for, the engine says so.
    compiled = OpenVinoEngine(run.bundle, Target(intra_op_threads=1), inference_precision="bf16")
    assert (compiled.compiled_precision == "bf16") == (compiled.resolved().warnings == ())


def test_the_ladder_adds_openvino_candidates(tmp_path: Path) -> None:
    recipe = parse_recipe({"model": "m.onnx", "data": {"eval": "e.npz"}, "budget": {"max_accuracy_drop": 0.01}})
    names = [c.name for c in auto_candidates(recipe, str(tmp_path / "cal.npz"))]
    assert names[-3:] == ["openvino-f32", "openvino-bf16", "openvino-int8"]
    bf16 = Candidate(name="b", passes=({"engine.openvino": {"precision": "bf16"}},))
    has_bf16 = bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    assert (engine_skip(bf16) is None) == has_bf16


def test_a_build_measures_openvino_and_records_the_choice(
    mlp_bundle_real: Bundle, digits: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    np.savez(tmp_path / "eval.npz", pixels=digits[2][:300], labels=digits[3][:300])
    recipe = parse_recipe(
        {
            "name": "digits",
            "model": str(mlp_bundle_real.path),
            "data": {"eval": str(tmp_path / "eval.npz")},
            "budget": {"max_accuracy_drop": 0.02},
            "batch_size": 64,
            "bench_time_s": 0.2,
            "output": str(tmp_path / "out"),
            "candidates": [{"name": "openvino-f32", "passes": [{"engine.openvino": {"precision": "f32"}}]}],
        }
    )
    result = run_build(recipe)
    record = result.record
    by_name = {c.name: c for c in record.candidates}
    assert by_name["openvino-f32"].status == "ok"
    # measured on OpenVINO, at the serving thread count, against the onnxruntime baseline's outputs
    f32 = by_name["openvino-f32"]
    assert f32.same_as is None and f32.metrics is not None and record.baseline.metrics is not None
    assert f32.metrics.quality == pytest.approx(record.baseline.metrics.quality, abs=1e-9)
    assert {"amx_bf16", "avx512_bf16", "avx512_vnni"} <= set(record.machine["cpu_features"])  # type: ignore[arg-type]
    assert "openvino" in record.versions
    # The winner carries the chosen engine and precision, with the CPU features, whichever engine won.
    written = json.loads((result.winner.path / "manifest.json").read_text())["resolved"]["engine"]
    assert record.selection is not None
    winner = record.selection.winner
    assert written["engine"] == ("onnxruntime" if winner == "baseline" else "openvino")
    assert engine_choice(result.winner.manifest).engine == written["engine"]
    assert set(written["cpu_features"]) == set(CPU_FEATURES) and written["measured"]["batch_size"] == 64
