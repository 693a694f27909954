"""The parity proof, against onnx's own reference evaluator as an independent 'source' implementation."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from slipstream.artifact.specs import graph_io_specs
from slipstream.errors import ParityError
from slipstream.importers.parity import InputCase, generated_cases, prove_parity, sample_cases, skipped
from tests.onnx_models import build_mlp, build_token_scorer


def _reference(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    evaluator = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, evaluator.run(None, dict(feeds)), strict=True))

    return run


def test_a_faithful_model_passes_at_every_batch_and_length() -> None:
    model = build_token_scorer()
    inputs, outputs = graph_io_specs(model.graph)
    cases = generated_cases(inputs)
    assert [(c.batch, c.dims) for c in cases] == [(1, {"seq": 8}), (1, {"seq": 13}), (3, {"seq": 8}), (3, {"seq": 13})]
    record = prove_parity(
        _reference(model), model.SerializeToString(), outputs, cases, reference_name="onnx reference", data="generated"
    )
    assert record.status == "passed"
    assert len(record.cases) == 4
    assert all(o.passed and o.max_abs_error <= 1e-4 for c in record.cases for o in c.outputs)


def test_every_mismatch_is_listed_in_one_error() -> None:
    source, converted = build_mlp((8, 16, 4), seed=0), build_mlp((8, 16, 4), seed=1)
    inputs, outputs = graph_io_specs(converted.graph)
    with pytest.raises(ParityError) as info:
        prove_parity(
            _reference(source), converted.SerializeToString(), outputs, generated_cases(inputs),
            reference_name="onnx reference", data="generated",
        )  # fmt: skip
    assert len(info.value.mismatches) == 2  # batch 1 and batch 3
    assert "[batch=1] output 'probabilities': max abs error" in str(info.value)
    assert "[batch=3]" in str(info.value)
    assert "--skip-parity" in str(info.value)
    assert "The inputs were generated" in str(info.value) and "--sample" in str(info.value)


def test_a_baked_in_sequence_length_is_caught_and_explained() -> None:
    """An exporter that froze seq=8 into a Reshape: fine at the export size, broken at any other."""
    shape = numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "frozen_shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "frozen_shape"], ["y"])],
        "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inputs, outputs = graph_io_specs(model.graph)

    def source(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.asarray(feeds["x"])}

    with pytest.raises(ParityError) as info:
        prove_parity(
            source, model.SerializeToString(), outputs, generated_cases(inputs), reference_name="s", data="generated"
        )
    text = str(info.value)
    assert "seq=13" in text and "baked in as a constant" in text
    assert "seq=8]" not in text  # the export size itself is fine


def test_integer_outputs_are_compared_exactly() -> None:
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0)],
        "argmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, outputs = graph_io_specs(model.graph)
    x = np.array([[0, 1, 0, 0], [3, 0, 0, 0]], dtype=np.float32)
    case = [InputCase(feeds={"x": x}, batch=2)]

    record = prove_parity(
        lambda f: {"label": np.argmax(f["x"], axis=1)}, model.SerializeToString(), outputs, case,
        reference_name="numpy", data="sample",
    )  # fmt: skip
    assert record.cases[0].outputs[0].exact
    with pytest.raises(ParityError, match="values differ"):
        prove_parity(
            lambda f: {"label": np.array([1, 1])}, model.SerializeToString(), outputs, case,
            reference_name="numpy", data="sample",
        )  # fmt: skip


def test_sample_cases_and_skipped_record() -> None:
    sample = {"x": np.zeros((50, 4), np.float32)}
    assert [c.batch for c in sample_cases(sample)] == [1, 32]
    assert [c.batch for c in sample_cases({"x": np.zeros((5, 4), np.float32)})] == [1, 5]
    record = skipped("torch eager", "--skip-parity given")
    assert record.status == "skipped" and record.data == "none" and record.cases == ()


def test_integer_outputs_can_be_given_a_tolerance() -> None:
    """Quantized models: an int8 output one step off is within a tolerance the importer chooses."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["q"], to=TensorProto.INT8)],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, outputs = graph_io_specs(model.graph)
    case = [InputCase(feeds={"x": np.array([[3.0, -5.0]], np.float32)}, batch=1)]

    def one_off(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"q": np.array([[4, -5]], np.int8)}

    with pytest.raises(ParityError, match="values differ"):
        prove_parity(one_off, model.SerializeToString(), outputs, case, reference_name="s", data="sample")
    record = prove_parity(
        one_off, model.SerializeToString(), outputs, case, reference_name="s", data="sample",
        tolerances={"int8": (1.0, 0.0)},
    )  # fmt: skip
    (result,) = record.cases[0].outputs
    assert not result.exact and result.max_abs_error == 1.0


def _zeroed_scorer() -> onnx.ModelProto:
    """A model whose output ignores its input (x * 0 + 0.5): any conversion giving 0.5 would match it."""
    zero = numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero")
    half = numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "half")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["dead"]), helper.make_node("Add", ["dead", "half"], ["y"])],
        "constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[zero, half],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("build", "informative"), [(_zeroed_scorer, False), (build_token_scorer, True)])
def test_a_constant_output_passes_but_is_reported_not_informative(
    build: Callable[[], onnx.ModelProto], informative: bool
) -> None:
    model = build()
    inputs, outputs = graph_io_specs(model.graph)
    record = prove_parity(
        _reference(model), model.SerializeToString(), outputs, generated_cases(inputs),
        reference_name="onnx reference", data="generated",
    )  # fmt: skip
    assert record.status == "passed" and record.informative is informative
    if informative:
        assert record.warnings == ()
    else:
        (warning,) = record.warnings
        assert warning.startswith("parity is not informative: output 'y'") and "--sample" in warning


def test_one_row_is_no_evidence_of_a_constant() -> None:
    """A single row cannot show that an output never moves: no warning from one case of batch 1."""
    model = _zeroed_scorer()
    _, outputs = graph_io_specs(model.graph)
    case = [InputCase(feeds={"x": np.ones((1, 4), np.float32)}, batch=1)]
    record = prove_parity(
        _reference(model), model.SerializeToString(), outputs, case, reference_name="r", data="sample"
    )
    assert record.informative
