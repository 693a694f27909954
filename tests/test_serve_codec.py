"""The OIP v2 tensor codec on its own: every datatype through binary, JSON nested/flat, precise errors."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import slipstream.serve as serve_pkg
from slipstream.errors import ProtocolError
from slipstream.serve.codec import MAX_RANK, NUMPY_OF, RequestedOutput, decode_request, encode_response


def _binary(inputs: list[tuple[str, str, np.ndarray, bytes]], **extra: object) -> tuple[bytes, int]:
    head = {
        "inputs": [
            {"name": n, "datatype": dt, "shape": list(a.shape), "parameters": {"binary_data_size": len(blob)}}
            for n, dt, a, blob in inputs
        ],
        **extra,
    }
    text = json.dumps(head).encode()
    return text + b"".join(blob for *_, blob in inputs), len(text)


@pytest.mark.parametrize("dt", [d for d in NUMPY_OF if d != "BYTES"])
def test_every_fixed_size_datatype_round_trips_through_binary(dt: str) -> None:
    array = (np.arange(6) % 2 == 0) if dt == "BOOL" else np.arange(6).astype(NUMPY_OF[dt])
    array = array.reshape(2, 3)
    body, length = _binary([("t", dt, array, array.astype(NUMPY_OF[dt]).tobytes())])
    decoded = decode_request(body, length).inputs["t"]
    np.testing.assert_array_equal(decoded, array)
    out, out_length = encode_response("m", "1", None, {"t": decoded}, [RequestedOutput("t", True)], False)
    assert out_length is not None
    head = json.loads(out[:out_length])
    assert head["outputs"][0]["datatype"] == dt and head["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_array_equal(np.frombuffer(out[out_length:], NUMPY_OF[dt]).reshape(2, 3), array)


def test_bytes_elements_are_length_prefixed_little_endian() -> None:
    items = ["", "abc", "ü"]
    blob = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in items)
    body, length = _binary([("s", "BYTES", np.array(items, dtype=object), blob)])
    decoded = decode_request(body, length).inputs["s"]
    assert decoded.tolist() == items
    out, out_length = encode_response("m", "1", "x", {"s": decoded}, [RequestedOutput("s", True)], False)
    assert out_length is not None and out[out_length:] == blob


def test_nested_and_flat_json_give_the_same_tensor() -> None:
    flat = decode_request(b'{"inputs":[{"name":"a","datatype":"INT32","shape":[2,2],"data":[1,2,3,4]}]}', None)
    nested = decode_request(b'{"inputs":[{"name":"a","datatype":"INT32","shape":[2,2],"data":[[1,2],[3,4]]}]}', None)
    np.testing.assert_array_equal(flat.inputs["a"], nested.inputs["a"])
    assert flat.inputs["a"].dtype == np.int32


_HEAD2 = b'{"inputs":[{"name":"a","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}'
_HEAD3 = b'{"inputs":[{"name":"a","datatype":"FP32","shape":[3],"parameters":{"binary_data_size":8}}]}'


@pytest.mark.parametrize(
    ("body", "length", "fragment"),
    [
        (
            b'{"inputs":[{"name":"a","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}' + b"\0" * 4,
            None,
            "not valid JSON",
        ),
        (_HEAD2 + b"\0" * 4, len(_HEAD2), "binary part has 4"),
        (_HEAD3 + b"\0" * 8, len(_HEAD3), "needs 12 bytes"),
        (b'{"inputs":[{"name":"a","datatype":"FP32","shape":[-1],"data":[1]}]}', None, "non-negative"),
        (b'{"inputs":[{"name":"a","datatype":"FP32","shape":[1]}]}', None, "neither"),
        (b'{"inputs":[{"name":"a","datatype":"UINT8","shape":[1],"data":[300]}]}', None, "regular array"),
        (
            b'{"id": 5, "inputs":[{"name":"a","datatype":"UINT8","shape":[1],"data":[3]}]}',
            None,
            "'id' must be a string",
        ),
        (
            b'{"inputs":[{"name":"a","datatype":"UINT8","shape":[1],"data":[3]},'
            b' {"name":"a","datatype":"UINT8","shape":[1],"data":[3]}]}',
            None,
            "more than once",
        ),
    ],
)
def test_malformed_requests_raise_a_400_that_says_what_is_wrong(body: bytes, length: int | None, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(body, length)
    assert info.value.status_code == 400 and fragment in info.value.message


def test_unclaimed_binary_bytes_are_an_error() -> None:
    body, length = _binary([("a", "UINT8", np.zeros(2, np.uint8), b"\0\0")])
    with pytest.raises(ProtocolError, match="no input claims"):
        decode_request(body + b"\0", length)


def _json_body(shape: list[int], data: list[int], datatype: str = "FP32", **extra: object) -> bytes:
    return json.dumps({"inputs": [{"name": "a", "datatype": datatype, "shape": shape, "data": data}], **extra}).encode()


_DEEP_HEAD = json.dumps(
    {"inputs": [{"name": "a", "datatype": "FP32", "shape": [1] * 1000 + [2], "parameters": {"binary_data_size": 8}}]}
).encode()
_HUGE_BYTES_HEAD = (
    b'{"inputs":[{"name":"a","datatype":"BYTES","shape":[1000000000000],"parameters":{"binary_data_size":4}}]}'
)


@pytest.mark.parametrize(
    ("body", "length", "fragment"),
    [
        (_json_body([1] * 1000 + [64], [0] * 64), None, "a shape of 1001 dimensions; at most 64"),
        (_json_body([1] * MAX_RANK + [1], [0]), None, "a shape of 65 dimensions; at most 64"),
        (_DEEP_HEAD + b"\0" * 8, len(_DEEP_HEAD), "a shape of 1001 dimensions; at most 64"),
        (_json_body([2**20, 2**20], [1]), None, "1099511627776 values; the request body has only"),
        (_json_body([2**32, 2**32], [1]), None, "past 2**56"),
        (_json_body([0, 2**62, 2**62], []), None, "past 2**56"),
        # a BYTES count is not checked against a byte length, so the shape itself must be bounded
        (_HUGE_BYTES_HEAD + b"\0" * 4, len(_HUGE_BYTES_HEAD), "1000000000000 values; the request body has only"),
        (_json_body([-1, 8], [0] * 8), None, "got -1 in [-1, 8]"),
        (_json_body([1], [0], outputs=[{"name": "y"}] * 10_000), None, "Output 'y' is requested more than once"),
        (_json_body([1], [0], id="x" * 257), None, "'id' is 257 characters; this server accepts at most 256"),
        # past the type's range a float became inf with only a RuntimeWarning (a 500 where warnings are errors)
        (_json_body([2], [1e300, 0]), None, "Input 'a' holds a value outside the FP32 range"),
        (_json_body([1], [1e39], "FP32"), None, "outside the FP32 range"),
    ],
)
def test_hostile_shapes_outputs_and_ids_are_400_not_500(body: bytes, length: int | None, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(body, length)
    assert info.value.status_code == 400 and fragment in info.value.message and info.value.hint


def test_the_deepest_shape_numpy_holds_is_accepted() -> None:
    assert decode_request(_json_body([1] * MAX_RANK, [7]), None).inputs["a"].ndim == MAX_RANK
    assert decode_request(_json_body([0, 1000], []), None).inputs["a"].shape == (0, 1000)


def test_the_id_limit_is_the_callers_to_set() -> None:
    assert decode_request(_json_body([1], [0], id="x" * 256), None).id == "x" * 256
    assert decode_request(_json_body([1], [0], id="x" * 300), None, max_id_chars=300).id == "x" * 300
    with pytest.raises(ProtocolError, match="'id' is 11 characters; this server accepts at most 10"):
        decode_request(_json_body([1], [0], id="x" * 11), None, max_id_chars=10)


@pytest.mark.parametrize(
    ("sent", "data"), [("INT32", [1]), ("INT64", [1]), ("UINT64", [2**64 - 1]), ("BOOL", [True]), ("FP64", [0.5])]
)
def test_a_tensor_is_decoded_as_the_datatype_it_was_sent_as(sent: str, data: list[object]) -> None:
    """Never cast: whether the datatype is the model's is the signature check's to say (test_serve_core.py)."""
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": sent, "shape": [1], "data": data}]}).encode()
    assert decode_request(body, None).inputs["pixels"].dtype == NUMPY_OF[sent]


def test_json_response_carries_id_version_and_only_the_wanted_outputs() -> None:
    results = {"a": np.array([[1.5, 2.0]], np.float32), "b": np.array([7], np.int64)}
    out, length = encode_response("m", "3", "req", results, [RequestedOutput("b", None)], False)
    assert length is None
    assert json.loads(out) == {
        "model_name": "m",
        "model_version": "3",
        "id": "req",
        "outputs": [{"name": "b", "datatype": "INT64", "shape": [1], "data": [7]}],
    }


def test_serving_imports_no_importer_pass_or_framework() -> None:
    """Imports point along the flow: serve/ may use artifact/, runtime/, errors, never importers/ or passes/."""
    forbidden = ("slipstream.importers", "slipstream.passes", "slipstream.build", "torch", "tensorflow", "sklearn")
    for path in Path(serve_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n.startswith(forbidden)]
            assert not bad, f"{path.name} imports {bad}"
