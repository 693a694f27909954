"""Each ONNX pass on real exported models (digits CNN and MLP from torch dynamo)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slipstream.artifact import Bundle
from slipstream.passes.binarize import binarize
from slipstream.passes.fidelity import session
from slipstream.passes.precision import CPU_NOTE
from slipstream.passes.quantize_static import GENERATED_NOTE
from slipstream.runtime.targets import cpu_flags, has_int8_dot_product
from tests.passes.helpers import accuracy, run_pass

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _ops(bundle: Bundle) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in bundle.load_model().graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_static_int8_on_real_calibration_data_keeps_accuracy(
    cnn_bundle: Bundle, calibration_npz: Path, digits: Digits, tmp_path: Path
) -> None:
    _, _, x_test, y_test = digits
    run, warned = run_pass(cnn_bundle, "quantize.static", tmp_path / "q", {"data": str(calibration_npz)})
    assert warned == []
    fp32, int8 = accuracy(cnn_bundle, x_test, y_test), accuracy(run.bundle, x_test, y_test)
    assert fp32 > 0.9
    assert fp32 - int8 <= 0.01
    resolved = run.bundle.manifest.resolved["quantize.static"]
    assert isinstance(resolved, dict)
    assert resolved["calibration_data"] == f"file {calibration_npz}"
    assert resolved["format"] == "qdq" and resolved["calibration"] == "minmax"
    assert "calibration_note" not in resolved
    # 'auto' took 7-bit weights exactly where this CPU lacks an int8 dot product, and said why.
    assert resolved["reduce_range"] is (not has_int8_dot_product())
    assert str(resolved["reduce_range_why"]).startswith("auto: this CPU has")
    assert _ops(run.bundle)["QuantizeLinear"] >= 3
    assert run.bundle.size_bytes < cnn_bundle.size_bytes / 3


def test_int8_dot_product_is_read_from_the_cpu_flags() -> None:
    assert has_int8_dot_product(cpu_flags("processor : 0\nflags : fpu avx2 fma avx512_vnni\n"))
    assert has_int8_dot_product(frozenset({"avx2", "amx_int8"}))
    assert not has_int8_dot_product(cpu_flags("flags\t\t: fpu sse4_2 avx2 fma\n"))
    assert cpu_flags("no flags here") == frozenset()


@pytest.mark.parametrize(("calibration", "fmt"), [("entropy", "qdq"), ("percentile", "qoperator")])
def test_static_int8_calibration_methods_and_formats(
    cnn_bundle: Bundle, calibration_npz: Path, digits: Digits, tmp_path: Path, calibration: str, fmt: str
) -> None:
    _, _, x_test, y_test = digits
    options = {"data": str(calibration_npz), "calibration": calibration, "format": fmt, "num_samples": 64}
    run, _ = run_pass(cnn_bundle, "quantize.static", tmp_path / "q", options)
    ops = _ops(run.bundle)
    assert ("QLinearConv" in ops) == (fmt == "qoperator")
    assert accuracy(cnn_bundle, x_test, y_test) - accuracy(run.bundle, x_test, y_test) <= 0.02


def test_histogram_calibration_takes_a_row_count_that_is_no_multiple_of_the_batch(
    cnn_bundle: Bundle, calibration_npz: Path, digits: Digits, tmp_path: Path
) -> None:
    """70 rows in batches of 32: onnxruntime's histogram calibrators stack every batch and failed on the ragged
    last one ("inhomogeneous shape", as on MiniLM's 126 sentences); the reader now leaves it out."""
    _, _, x_test, y_test = digits
    options = {"data": str(calibration_npz), "calibration": "percentile", "num_samples": 70, "batch_size": 32}
    run, _ = run_pass(cnn_bundle, "quantize.static", tmp_path / "q", options)
    assert accuracy(cnn_bundle, x_test, y_test) - accuracy(run.bundle, x_test, y_test) <= 0.02


def test_static_int8_on_generated_data_says_so(cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, warned = run_pass(cnn_bundle, "quantize.static", tmp_path / "q", {"num_samples": 16})
    resolved = run.bundle.manifest.resolved["quantize.static"]
    assert isinstance(resolved, dict)
    assert resolved["calibration_data"] == "generated"
    assert resolved["calibration_note"] == GENERATED_NOTE
    assert any("GENERATED" in w for w in warned)


def test_dynamic_int8_warns_loudly_on_conv(cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, warned = run_pass(cnn_bundle, "quantize.dynamic", tmp_path / "q")
    assert _ops(run.bundle).get("ConvInteger") == 2
    assert any("ConvInteger" in w and "7× SLOWER" in w for w in warned)
    assert run.bundle.manifest.resolved["quantize.dynamic"]["warnings"]  # type: ignore[index]


def test_dynamic_int8_can_leave_conv_alone(cnn_bundle: Bundle, digits: Digits, tmp_path: Path) -> None:
    _, _, x_test, y_test = digits
    run, warned = run_pass(cnn_bundle, "quantize.dynamic", tmp_path / "q", {"op_types": ["MatMul", "Gemm"]})
    ops = _ops(run.bundle)
    assert "ConvInteger" not in ops and ops.get("MatMulInteger", 0) >= 1
    assert warned == []
    assert accuracy(cnn_bundle, x_test, y_test) - accuracy(run.bundle, x_test, y_test) <= 0.01


def test_dynamic_int8_on_the_mlp_is_silent_and_4x_smaller(mlp_bundle_real: Bundle, tmp_path: Path) -> None:
    run, warned = run_pass(mlp_bundle_real, "quantize.dynamic", tmp_path / "q")
    assert warned == []
    assert _ops(run.bundle)["MatMulInteger"] == 3
    assert mlp_bundle_real.size_bytes / run.bundle.size_bytes > 3.0


def test_dynamic_int8_after_graph_optimize_works_and_says_what_it_missed(cnn_bundle: Bundle, tmp_path: Path) -> None:
    fused, _ = run_pass(cnn_bundle, "graph.optimize", tmp_path / "g")
    run, warned = run_pass(fused.bundle, "quantize.dynamic", tmp_path / "q")
    assert any("already fused by graph.optimize" in w and "FusedConv" in w for w in warned)
    resolved = run.bundle.manifest.resolved["quantize.dynamic"]
    assert isinstance(resolved, dict) and resolved["input_was_fused"] is True
    assert sorted(p.name for p in Path.cwd().glob("sym_shape_infer_temp*")) == []


def test_graph_optimize_records_fusions(cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(cnn_bundle, "graph.optimize", tmp_path / "g", {"level": "extended"})
    metrics = run.bundle.manifest.metrics["graph.optimize"]
    assert isinstance(metrics, dict)
    changes = metrics["op_changes"]
    assert isinstance(changes, dict)
    assert changes["com.microsoft.FusedConv"] == 2 and changes["Relu"] < 0
    assert metrics["nodes_out"] < metrics["nodes_in"]  # type: ignore[operator]
    fidelity = metrics["fidelity"]["outputs"]["logits"]  # type: ignore[index,call-overload]
    assert fidelity["max_abs_diff"] < 1e-4


def test_fp16_halves_the_size_and_keeps_fp32_io(cnn_bundle: Bundle, digits: Digits, tmp_path: Path) -> None:
    _, _, x_test, y_test = digits
    run, _ = run_pass(cnn_bundle, "precision.fp16", tmp_path / "h")
    model = run.bundle.load_model()
    kinds = {
        t.data_type
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    assert kinds == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weight_bytes = [sum(len(t.raw_data) for t in m.graph.initializer) for m in (cnn_bundle.load_model(), model)]
    assert weight_bytes[0] / weight_bytes[1] > 1.99
    assert cnn_bundle.size_bytes / run.bundle.size_bytes > 1.8  # the graph itself does not shrink
    assert run.bundle.manifest.resolved["precision.fp16"]["note"] == CPU_NOTE  # type: ignore[index]
    assert abs(accuracy(cnn_bundle, x_test, y_test) - accuracy(run.bundle, x_test, y_test)) <= 0.005


def test_fp16_block_list_keeps_ops_in_fp32(cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(cnn_bundle, "precision.fp16", tmp_path / "h", {"op_block_list": ["Gemm"]})
    model = run.bundle.load_model()
    fp32_casts = {
        n.output[0] for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT
    }
    fp32_inits = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2
    assert all(i in fp32_casts | fp32_inits for n in gemms for i in n.input)


def test_int4_rewrites_gemm_then_quantizes(mlp_bundle_real: Bundle, digits: Digits, tmp_path: Path) -> None:
    _, _, x_test, y_test = digits
    run, warned = run_pass(mlp_bundle_real, "weights.int4", tmp_path / "w")
    assert warned == []
    assert _ops(run.bundle)["MatMulNBits"] == 3 and "Gemm" not in _ops(run.bundle)
    assert run.bundle.manifest.resolved["weights.int4"]["gemm_rewritten_to_matmul"] == 3  # type: ignore[index]
    assert mlp_bundle_real.size_bytes / run.bundle.size_bytes > 4.0
    assert accuracy(mlp_bundle_real, x_test, y_test) - accuracy(run.bundle, x_test, y_test) <= 0.02


def test_int4_without_the_rewrite_quantizes_nothing_and_says_so(mlp_bundle_real: Bundle, tmp_path: Path) -> None:
    run, warned = run_pass(mlp_bundle_real, "weights.int4", tmp_path / "w", {"rewrite_gemm": False})
    assert "MatMulNBits" not in _ops(run.bundle)
    assert any("no MatMul was quantized" in w for w in warned)


def test_binarize_stores_packed_bits_that_unpack_exactly(mlp_bundle_real: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(mlp_bundle_real, "weights.binarize", tmp_path / "b")
    metrics = run.bundle.manifest.metrics["weights.binarize"]
    assert isinstance(metrics, dict)
    assert metrics["binarized_layers"] == 3
    assert metrics["binarized_compression"] > 20  # type: ignore[operator]
    inits = run.bundle.load_model().graph.initializer
    packed = [t for t in inits if t.name.endswith("__signbits")]
    assert len(packed) == 3 and all(t.data_type == onnx.TensorProto.UINT8 for t in packed)
    assert not any(t.name in ("1.weight", "3.weight", "5.weight") for t in inits)
    # Reference: the same graph with sign(W)·mean|W| written in directly with numpy.
    reference = mlp_bundle_real.load_model()
    for t in reference.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.ndim == 2 and w.size >= 1024:
            node = next(n for n in reference.graph.node if len(n.input) > 1 and n.input[1] == t.name)
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            bits, scale = binarize(w, 0 if trans_b else 1)
            signs = np.unpackbits(bits)[: w.size].reshape(w.shape).astype(np.float32) * 2 - 1
            t.CopyFrom(numpy_helper.from_array((signs * scale).astype(np.float32), t.name))
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    want = session(reference).run(None, {"pixels": x})[0]
    got = session(run.bundle.load_model()).run(None, {"pixels": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_binarize_reports_its_accuracy_cost(mlp_bundle_real: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(mlp_bundle_real, "weights.binarize", tmp_path / "b")
    fidelity = run.bundle.manifest.metrics["weights.binarize"]["fidelity"]  # type: ignore[index,call-overload]
    cosine = fidelity["outputs"]["logits"]["cosine"]
    assert 0.0 < cosine < 0.9999  # a real, reported cost
    assert "accuracy cost" in run.bundle.manifest.resolved["weights.binarize"]["note"]  # type: ignore[index]


@pytest.mark.parametrize("name", ["prune.magnitude", "prune.random"])
def test_per_layer_pruning_hits_the_sparsity_in_every_layer(cnn_bundle: Bundle, tmp_path: Path, name: str) -> None:
    run, _ = run_pass(cnn_bundle, name, tmp_path / "p", {"sparsity": 0.6})
    metrics = run.bundle.manifest.metrics[name]
    assert isinstance(metrics, dict)
    per_layer = metrics["sparsity_per_layer"]
    assert isinstance(per_layer, dict) and len(per_layer) == 3
    assert all(abs(v - 0.6) < 0.002 for v in per_layer.values())  # type: ignore[operator,arg-type]
    assert metrics["gzip_bytes_out"] < 0.75 * metrics["gzip_bytes_in"]  # type: ignore[operator]


def test_global_magnitude_pruning_uses_one_threshold(cnn_bundle: Bundle, tmp_path: Path) -> None:
    run, _ = run_pass(cnn_bundle, "prune.magnitude", tmp_path / "p", {"sparsity": 0.5, "scope": "global"})
    before = {t.name: numpy_helper.to_array(t) for t in cnn_bundle.load_model().graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in run.bundle.load_model().graph.initializer}
    pruned = list(run.bundle.manifest.resolved["prune.magnitude"]["pruned_weights"])  # type: ignore[index,union-attr]
    kept_min = min(float(np.abs(after[n][after[n] != 0]).min()) for n in pruned)
    dropped_max = max(float(np.abs(before[n][after[n] == 0]).max()) for n in pruned)
    assert dropped_max <= kept_min
    metrics = run.bundle.manifest.metrics["prune.magnitude"]
    assert abs(metrics["sparsity"] - 0.5) < 0.001  # type: ignore[index,call-overload,operator]


def test_random_pruning_depends_on_its_seed(cnn_bundle: Bundle, tmp_path: Path) -> None:
    a, _ = run_pass(cnn_bundle, "prune.random", tmp_path / "a", {"seed": 1})
    b, _ = run_pass(cnn_bundle, "prune.random", tmp_path / "b", {"seed": 2})
    assert a.bundle.model_sha256 != b.bundle.model_sha256


@pytest.mark.slow
def test_transformer_fusions_then_dynamic_int8(transformer_bundle: Bundle, tmp_path: Path) -> None:
    """The pitfall: quantizing a graph the transformer optimizer already fused. It must work."""
    fused, _ = run_pass(transformer_bundle, "graph.optimize", tmp_path / "g")
    resolved = fused.bundle.manifest.resolved["graph.optimize"]
    assert isinstance(resolved, dict) and resolved["transformer_fusions"] == "bert"
    assert resolved["fused_operators"] == {"SkipLayerNormalization": 4}
    run, warned = run_pass(fused.bundle, "quantize.dynamic", tmp_path / "q")
    assert warned == []  # the fused MatMuls here multiply activations, not weights: nothing was hidden
    ops = _ops(run.bundle)
    assert ops["MatMulInteger"] >= 8 and ops["SkipLayerNormalization"] == 4
    ids = np.random.default_rng(0).integers(0, 50, size=(3, 11)).astype(np.int64)
    want = session(transformer_bundle.load_model()).run(None, {"input_ids": ids})[0]
    got = session(run.bundle.load_model()).run(None, {"input_ids": ids})[0]
    assert got.shape == want.shape == (3, 32)
    cos = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
    assert cos > 0.98


def test_graph_optimize_after_binarize_warns_that_the_gain_is_lost(mlp_bundle_real: Bundle, tmp_path: Path) -> None:
    packed, _ = run_pass(mlp_bundle_real, "weights.binarize", tmp_path / "b")
    run, warned = run_pass(packed.bundle, "graph.optimize", tmp_path / "g")
    assert run.bundle.size_bytes > 5 * packed.bundle.size_bytes
    assert any("unpacked compressed weights" in w for w in warned)


@pytest.mark.slow
def test_a_pass_leaves_the_callers_root_logger_as_it_was(cnn_bundle: Bundle, tmp_path: Path) -> None:
    """onnxruntime's dynamic quantizer logs through the root logger, which installs a stderr handler on a bare
    one; the pass runner takes it off again, so a CLI's or a server's output is not interleaved with it. Run in
    a fresh interpreter: under pytest the root logger already has capture handlers, and nothing is installed."""
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "from slipstream.passes.recipe import optimize\n"
        "optimize(sys.argv[1], ['quantize.dynamic:per_channel=false'], sys.argv[2], cache=False)\n"
        "print(len(logging.getLogger().handlers), logging.getLogger().level)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(cnn_bundle.path), str(tmp_path / "q")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.split() == ["0", str(logging.WARNING)], done.stdout + done.stderr
