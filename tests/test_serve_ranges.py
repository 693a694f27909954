"""Input ranges the server enforces, end to end over HTTP on a real PyTorch export.

A token encoder with a 40-row vocabulary and a 16-row position table is exported once (dynamo, with its
parity proof); the importer reads both limits from the graph. A token id past the vocabulary or a
sequence past the position table is the client's error: a 400 that names the range, in JSON and in
binary tensors alike, never onnxruntime's text or a 500. A bundle whose manifest lacks the limits gets
the same 400 from onnxruntime's own failure, with onnxruntime's text in the log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import torch
from jsonschema import Draft4Validator
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import slipstream
from slipstream.artifact import Bundle, write_bundle
from slipstream.importers import import_onnx
from slipstream.importers.torch_sources import load_torch_source
from slipstream.serve import ServeSettings, create_app

VOCAB, POSITIONS = 40, 16
OPENAPI = Path(__file__).parents[1] / "src" / "slipstream" / "serve" / "openapi.json"


class PositionalEncoder(nn.Module):
    """Token ids [batch, seq] → token + position embeddings → a 3-way score: BERT's embedding layout."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, 8)
        self.positions = nn.Embedding(POSITIONS, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        where = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.head((self.tokens(input_ids) + self.positions(where)).mean(dim=1))


@pytest.fixture(scope="module")
def encoder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    return slipstream.convert(
        PositionalEncoder().eval(), tmp_path_factory.mktemp("ranges") / "encoder", example_inputs=(ids,),
        dynamic_axes=["input_ids:1=seq"], output_names=["scores"], name="encoder",
    )  # fmt: skip


@pytest.fixture(scope="module")
def unranged(encoder_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model, its manifest stripped of what the graph said: only onnxruntime stands guard."""
    spec = encoder_bundle.manifest.inputs[0].model_copy(update={"value_range": None, "max_shape": None})
    manifest = encoder_bundle.manifest.model_copy(update={"inputs": (spec,)})
    dest = tmp_path_factory.mktemp("unranged") / "encoder"
    write_bundle(dest, onnx.load(str(encoder_bundle.model_path)), manifest)
    return dest


def serve(path: Path, requests: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    """Answer ``requests`` in order from one app (started once) through the ASGI transport."""
    app = create_app(path, ServeSettings(access_log=False))

    async def go() -> list[httpx.Response]:
        await app.startup()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                return [await client.request(method, url, **kwargs) for method, url, kwargs in requests]
        finally:
            await app.shutdown()

    return asyncio.run(go())


def as_json(ids: np.ndarray, request_id: str = "r") -> dict[str, Any]:
    body = {"id": request_id, "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape)}]}
    body["inputs"][0]["data"] = ids.reshape(-1).tolist()
    return {"json": body, "headers": {"x-request-id": request_id}}


def as_binary(ids: np.ndarray) -> dict[str, Any]:
    raw = np.ascontiguousarray(ids, dtype="<i8").tobytes()
    head = {
        "inputs": [
            {
                "name": "input_ids",
                "datatype": "INT64",
                "shape": list(ids.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    text = json.dumps(head).encode()
    return {"content": text + raw, "headers": {"inference-header-content-length": str(len(text))}}


def infer(kwargs: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    return ("POST", "/v2/models/encoder/infer", kwargs)


GOOD = np.array([[1, 2, 3, 39, 0, 5]])
OOV = np.array([[1, 2, VOCAB, 3]])  # one id past the vocabulary's last row (39)
LONG = np.ones((1, POSITIONS + 4), dtype=np.int64)  # four tokens past the position table


def test_the_importer_reads_the_vocabulary_and_the_position_table_from_the_graph(encoder_bundle: Bundle) -> None:
    (spec,) = encoder_bundle.manifest.inputs
    assert spec.shape == ("batch", "seq")
    assert spec.value_range == (0.0, VOCAB - 1.0)
    assert spec.max_shape == (None, POSITIONS)
    assert spec.quantization is None
    assert "quantization" not in spec.model_dump()  # unset fields stay out of the manifest


def test_an_out_of_vocabulary_id_is_a_400_naming_the_range_in_json_and_binary(encoder_bundle: Bundle) -> None:
    ok, json_oov, binary_oov, negative = serve(
        encoder_bundle.path, [infer(as_json(GOOD)), infer(as_json(OOV)), infer(as_binary(OOV)), infer(as_json(-GOOD))]
    )
    assert ok.status_code == 200, ok.text
    for got in (json_oov, binary_oov):
        assert got.status_code == 400
        error = got.json()["error"]
        assert "Input 'input_ids' must lie in [0, 39]; got values in [1, 40] (1 outside)" in error
        assert "tokenizer" in error and "onnxruntime" not in error.lower()
    assert negative.status_code == 400 and "[0, 39]" in negative.json()["error"]


def test_a_sequence_past_the_position_table_is_a_400_naming_the_limit(encoder_bundle: Bundle) -> None:
    at_limit, json_long, binary_long = serve(
        encoder_bundle.path,
        [infer(as_json(np.ones((2, POSITIONS), dtype=np.int64))), infer(as_json(LONG)), infer(as_binary(LONG))],
    )
    assert at_limit.status_code == 200, at_limit.text
    for got in (json_long, binary_long):
        assert got.status_code == 400
        error = got.json()["error"]
        assert "Input 'input_ids' axis 1 ('seq') has size 20; this model takes at most 16 there" in error
        assert "Truncate the sequence to 16" in error


def test_onnxruntime_failing_on_the_input_is_a_400_and_its_text_goes_to_the_log(
    unranged: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="slipstream.serve"):
        ok, oov, long = serve(
            unranged, [infer(as_json(GOOD)), infer(as_json(OOV, "oov-1")), infer(as_json(LONG, "long-1"))]
        )
    assert ok.status_code == 200, ok.text
    assert oov.status_code == 400 and long.status_code == 400
    oov_error, long_error = oov.json()["error"], long.json()["error"]
    assert "an id or index is outside the table it indexes" in oov_error
    assert "the input's sizes do not fit together inside the model" in long_error
    for error, request_id in ((oov_error, "oov-1"), (long_error, "long-1")):
        assert "It takes 'input_ids' int64 [batch, seq]" in error and f"request id {request_id}" in error
        for private in ("onnxruntime_src", "node_", "Status Message", "Gather", ".cc", ".h:"):
            assert private not in error
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "oov-1" in logged and "indices element out of data bounds" in logged
    assert "long-1" in logged and "broadcast" in logged


def test_the_metadata_shows_the_range_and_the_limit_as_documented(encoder_bundle: Bundle) -> None:
    (meta,) = serve(encoder_bundle.path, [("GET", "/v2/models/encoder", {})])
    doc = meta.json()
    assert doc["inputs"] == [
        {
            "name": "input_ids",
            "datatype": "INT64",
            "shape": [-1, -1],
            "parameters": {"value_min": 0, "value_max": 39, "max_size_axis_1": 16},
        }
    ]
    assert "parameters" not in doc["outputs"][0]  # nothing known: the plain OIP description
    _valid_tensor_metadata(doc)


def _valid_tensor_metadata(doc: dict[str, Any]) -> None:
    schema = json.loads(OPENAPI.read_text(encoding="utf-8"))["components"]["schemas"]["TensorMetadata"]
    validator = Draft4Validator(schema)  # OpenAPI 3.0 schemas are draft-4 style (boolean exclusiveMinimum)
    for tensor in (*doc["inputs"], *doc["outputs"]):
        errors = [e.message for e in validator.iter_errors(tensor)]
        assert errors == [], errors


def _dequantizing_model() -> onnx.ModelProto:
    """An int8 input read through DequantizeLinear (scale 0.05, zero point -3), as TFLite int8 io models are."""
    scale = numpy_helper.from_array(np.array(0.05, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.array(-3, dtype=np.int8), "zero")
    weight = numpy_helper.from_array(np.full((4, 2), 0.5, dtype=np.float32), "weight")
    nodes = [
        helper.make_node("DequantizeLinear", ["pixels", "scale", "zero"], ["real"]),
        helper.make_node("MatMul", ["real", "weight"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dequantizing",
        [helper.make_tensor_value_info("pixels", TensorProto.INT8, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 2])],
        initializer=[scale, zero, weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_quantized_input_records_its_scale_and_zero_point_and_the_metadata_shows_them(tmp_path: Path) -> None:
    onnx.save_model(_dequantizing_model(), str(tmp_path / "q.onnx"))
    bundle = import_onnx(tmp_path / "q.onnx", tmp_path / "q", name="q")
    (spec,) = bundle.manifest.inputs
    assert spec.quantization is not None
    assert (spec.quantization.scale, spec.quantization.zero_point) == (pytest.approx(0.05), -3)
    assert spec.value_range is None and spec.max_shape is None
    real = np.array([[1.0, 0.0, 0.15, 0.2]])
    pixels = np.round(real / spec.quantization.scale) + spec.quantization.zero_point  # what a client does
    request = {"inputs": [{"name": "pixels", "datatype": "INT8", "shape": [1, 4], "data": pixels.ravel().tolist()}]}
    meta, answer = serve(bundle.path, [("GET", "/v2/models/q", {}), ("POST", "/v2/models/q/infer", {"json": request})])
    params = meta.json()["inputs"][0]["parameters"]
    assert params == {"quantization_scale": pytest.approx(0.05), "quantization_zero_point": -3}
    _valid_tensor_metadata(meta.json())
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["outputs"][0]["data"], [0.675, 0.675], rtol=1e-6)


def _factories(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "zoo.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def example_inputs():
                return (torch.zeros(1, 4),)

            def make_small():
                torch.manual_seed(0)
                return nn.Linear(4, 2)

            def make_wide():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            """
        )
    )
    return f"{tmp_path / 'zoo.py'}:make_small", f"{tmp_path / 'zoo.py'}:make_wide"


def test_bundles_from_two_factories_in_one_file_get_distinct_names(tmp_path: Path) -> None:
    small, wide = _factories(tmp_path)
    names = [load_torch_source(ep, trust_pickle=False).name for ep in (small, wide)]
    assert names == ["zoo-make_small", "zoo-make_wide"]  # served side by side, they must not collide
    assert slipstream.convert(wide, tmp_path / "wide").manifest.name == "zoo-make_wide"


def _positions_graph(pattern: str) -> onnx.ModelProto:
    """input_ids and attention_mask [batch, seq]; the sequence length reaches a 16-row table one way or another."""
    table = numpy_helper.from_array(np.zeros((POSITIONS, 4), dtype=np.float32), "pos")
    ids = numpy_helper.from_array(np.arange(POSITIONS, dtype=np.int64)[None], "position_ids")
    consts = [
        numpy_helper.from_array(np.array(v, dtype=np.int64), n)
        for n, v in (("zero", 0), ("one", 1), ("zero1", [0]), ("one1", [1]))
    ]
    size = [helper.make_node("Shape", ["input_ids"], ["seq"], start=1, end=2)]
    if pattern == "torchscript":  # the whole shape, then Gather(shape, 1), a Cast, and a scalar Range end
        size = [
            helper.make_node("Shape", ["input_ids"], ["shape"]),
            helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        ]
    tail = {
        "range": [helper.make_node("Range", ["zero", "seq", "one"], ["where"])],
        "torchscript": [
            helper.make_node("Cast", ["seq"], ["seq64"], to=TensorProto.INT64),
            helper.make_node("Range", ["zero", "seq64", "one"], ["where"]),
        ],
        "buffer": [helper.make_node("Slice", ["position_ids", "zero1", "seq", "one1", "one1"], ["where"])],
        "unbounded": [helper.make_node("Range", ["zero", "seq", "one"], ["where_i"]),
                      helper.make_node("Add", ["where_i", "one"], ["where"])],
    }[pattern]  # fmt: skip
    nodes = [*size, *tail, helper.make_node("Gather", ["pos", "where"], ["out"])]
    graph = helper.make_graph(
        nodes,
        pattern,
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=[table, ids, *consts],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("pattern", "limit"), [("range", POSITIONS), ("torchscript", POSITIONS), ("buffer", POSITIONS), ("unbounded", None)]
)
def test_the_sequence_limit_is_read_from_the_position_table_or_left_unset(pattern: str, limit: int | None) -> None:
    from slipstream.artifact.specs import graph_io_specs
    from slipstream.importers.input_ranges import with_graph_ranges

    model = _positions_graph(pattern)
    specs = with_graph_ranges(graph_io_specs(model.graph)[0], model)
    expected = None if limit is None else (None, limit)
    assert [s.max_shape for s in specs] == [expected, expected]  # the mask shares 'seq', so the same limit
    assert [s.value_range for s in specs] == [None, None]  # neither indexes a table itself
