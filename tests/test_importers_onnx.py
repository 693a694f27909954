from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from slipstream.artifact import Bundle, TensorSpec
from slipstream.errors import ConversionError, InvalidModelError
from slipstream.importers import convert, import_onnx
from tests.onnx_models import build_mlp, build_token_scorer, save_with_external_data


def test_io_specs_come_from_the_graph(mlp_bundle: Bundle) -> None:
    m = mlp_bundle.manifest
    assert m.inputs == (TensorSpec(name="pixels", dtype="float32", shape=("batch", 8)),)
    assert m.outputs == (TensorSpec(name="probabilities", dtype="float32", shape=("batch", 4)),)
    assert m.source.framework == "onnx"
    assert m.source.sha256 is not None and len(m.source.sha256) == 64
    assert m.resolved["opset"] == 17
    assert [e.step for e in m.lineage] == ["import.onnx@1"]
    assert m.lineage[0].input_sha256 == m.source.sha256


def test_multiple_inputs_and_integer_dtypes(scorer_onnx: Path, tmp_path: Path) -> None:
    bundle = import_onnx(scorer_onnx, tmp_path / "b", name="scorer", version="3")
    names = [(s.name, s.dtype, s.shape) for s in bundle.manifest.inputs]
    assert names == [("input_ids", "int64", ("batch", "seq")), ("attention_mask", "float32", ("batch", "seq"))]
    assert bundle.manifest.outputs[0].shape == ("batch",)
    assert (bundle.manifest.name, bundle.manifest.version) == ("scorer", "3")


def test_external_data_is_read_and_the_source_left_alone(tmp_path: Path) -> None:
    src = save_with_external_data(build_mlp((8, 16, 4)), tmp_path / "ext.onnx")
    side = tmp_path / "ext.onnx.weights"
    before = (src.read_bytes(), side.read_bytes())
    bundle = import_onnx(src, tmp_path / "b")
    assert (src.read_bytes(), side.read_bytes()) == before
    model = bundle.load_model()
    assert {t.name for t in model.graph.initializer} >= {"fc0.weight", "fc1.weight"}
    assert all(len(t.raw_data) > 0 for t in model.graph.initializer)


def test_missing_external_data_is_explained(tmp_path: Path) -> None:
    src = save_with_external_data(build_mlp((8, 16, 4)), tmp_path / "ext.onnx")
    (tmp_path / "ext.onnx.weights").unlink()
    with pytest.raises(InvalidModelError, match="external data"):
        import_onnx(src, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_garbage_file_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    with pytest.raises(InvalidModelError, match="not a readable ONNX model"):
        import_onnx(bad, tmp_path / "b")


def test_checker_failure_is_reported(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(InvalidModelError, match="ONNX checker"):
        import_onnx(path, tmp_path / "b")


def test_non_tensor_outputs_are_refused(tmp_path: Path) -> None:
    seq_out = helper.make_tensor_sequence_value_info("ys", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["ys"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [seq_out],
    )
    path = tmp_path / "seq.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InvalidModelError, match="not a tensor"):
        import_onnx(path, tmp_path / "b")


def test_unknown_suffix_says_what_is_supported(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(ConversionError, match=r"suffix '\.bin'"):
        convert(path, tmp_path / "b")


def test_unnamed_dynamic_dims_get_a_stable_symbol(tmp_path: Path) -> None:
    model = build_token_scorer()
    model.graph.input[0].type.tensor_type.shape.dim[1].ClearField("dim_param")
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    bundle = import_onnx(path, tmp_path / "b")
    assert bundle.manifest.inputs[0].shape == ("batch", "input_ids_dim1")
