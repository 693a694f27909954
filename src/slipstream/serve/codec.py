"""The Open Inference Protocol v2 tensor codec: JSON (nested or flat) and the binary tensor extension.

A request body is JSON, optionally followed by raw little-endian tensors; the
``Inference-Header-Content-Length`` header says where the JSON ends. Pure functions over bytes and
numpy arrays, so the HTTP layer stays thin and this file is tested without a server.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from slipstream.artifact.tensor import DType
from slipstream.errors import ProtocolError
from slipstream.serve.request import InferenceRequest, RequestedOutput

# numpy's own limit (NPY_MAXDIMS); a deeper shape cannot become an array, so it is refused as bad input.
MAX_RANK = 64
# The most elements a shape may span, counting a 0 as 1: past this numpy cannot size the array at all.
_MAX_SPAN = 2**56
DEFAULT_MAX_ID_CHARS = 256

# OIP datatype -> numpy dtype (little-endian). BYTES travels as an object array of bytes/str.
NUMPY_OF: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

# Manifest dtype -> OIP datatype.
DATATYPE_OF: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
    "string": "BYTES",
}

_NUMPY_KIND_TO_DATATYPE = {np.dtype(v).str.lstrip("<|="): k for k, v in NUMPY_OF.items() if k != "BYTES"}


def datatype(dtype: DType) -> str:
    return DATATYPE_OF[dtype]


_DATATYPE_OF_DTYPE: dict[np.dtype[Any], str] = {}


def datatype_of_array(array: np.ndarray) -> str:
    dtype = array.dtype
    found = _DATATYPE_OF_DTYPE.get(dtype)
    if found is None:
        found = "BYTES" if dtype.kind in "OUS" else _NUMPY_KIND_TO_DATATYPE[dtype.str.lstrip("<|=>")]
        if dtype.kind not in "OUS":  # string dtypes vary by length; the few numeric ones are remembered
            _DATATYPE_OF_DTYPE[dtype] = found
    return found


def _fail(message: str, hint: str | None = None) -> ProtocolError:
    return ProtocolError(message, hint=hint or "See the Open Inference Protocol v2 infer request format.")


def _loads(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"The request body is not valid JSON ({exc}).") from exc


def _shape(item: Mapping[str, Any], name: str, body_bytes: int) -> tuple[tuple[int, ...], int]:
    """The tensor's shape and value count, refused unless numpy can hold it and the body can carry them."""
    shape = item.get("shape")
    if not isinstance(shape, list):
        raise _fail(f"Input '{name}' needs 'shape', a list of non-negative integers; got {_brief(shape)}.")
    if len(shape) > MAX_RANK:
        raise _fail(
            f"Input '{name}' has a shape of {len(shape)} dimensions; at most {MAX_RANK} are supported.",
            "Send the tensor with its real shape (e.g. [batch, features]); drop the extra axes of size 1.",
        )
    count = span = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise _fail(
                f"Input '{name}' needs 'shape', a list of non-negative integers; got {_brief(d)} in {_brief(shape)}.",
                "Give every dimension as a whole number >= 0 (the protocol's -1 is for metadata, not requests).",
            )
        count *= d
        span *= d or 1
    if span > _MAX_SPAN:
        raise _fail(
            f"Input '{name}' has shape {_brief(shape)}, whose dimensions multiply (zeros aside) past 2**56, "
            "more elements than any array can hold.",
            "Make 'shape' match the data sent (the product of the dimensions is the number of values).",
        )
    if count > body_bytes:
        # Every value takes at least one byte of the body (JSON text or binary), so a larger count is a lie.
        raise _fail(
            f"Input '{name}' has shape {_brief(shape)}, {_brief(count)} values; the request body has only "
            f"{body_bytes} bytes, so it cannot carry them.",
            "Make 'shape' match the data sent (the product of the dimensions is the number of values).",
        )
    return tuple(shape), count


def _brief(value: Any, limit: int = 80) -> str:
    """``repr`` cut short, so a hostile value cannot blow up the error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _unpack_bytes(raw: memoryview, count: int, name: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise _fail(f"Input '{name}': BYTES data ends inside element {i} of {count}.")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise _fail(f"Input '{name}': BYTES element {i} says {length} bytes but the data ends first.")
        try:
            # onnxruntime string tensors take str (it would stringify bytes as "b'...'").
            out[i] = bytes(raw[pos : pos + length]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(f"Input '{name}': BYTES element {i} is not UTF-8 text ({exc}).") from exc
        pos += length
    if pos != len(raw):
        raise _fail(f"Input '{name}': {len(raw) - pos} bytes left over after {count} BYTES elements.")
    return out


def _from_binary(raw: memoryview, dt: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if dt == "BYTES":
        return _unpack_bytes(raw, count, name).reshape(shape)
    want = count * NUMPY_OF[dt].itemsize
    if len(raw) != want:
        raise _fail(f"Input '{name}' ({dt} {list(shape)}) needs {want} bytes of binary data; got {len(raw)}.")
    return np.frombuffer(raw, dtype=NUMPY_OF[dt]).reshape(shape)


def _from_json(data: Any, dt: str, shape: tuple[int, ...], count: int, name: str) -> np.ndarray:
    if dt == "FP16":
        raise _fail(f"Input '{name}' is FP16, which travels only as binary data.", "Send it with binary_data_size.")
    try:
        if dt == "FP32":
            # A JSON number past FP32's range would become inf with only a RuntimeWarning. (Integers past
            # their type raise OverflowError by themselves, and JSON numbers all fit FP64.)
            with np.errstate(over="raise"):
                flat = np.array(data, dtype=np.float32)
        else:
            flat = np.array(data, dtype=NUMPY_OF[dt])
    except FloatingPointError as exc:
        raise _fail(
            f"Input '{name}' holds a value outside the {dt} range ({exc}).",
            f"Send values that {dt} can hold, or send the data as the model's wider type if it has one.",
        ) from exc
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail(f"Input '{name}': 'data' is not a regular array of {dt} values ({exc}).") from exc
    if flat.size != count:
        raise _fail(
            f"Input '{name}' has shape {list(shape)} ({count} values) but 'data' holds {flat.size}.",
            "Make 'data' match 'shape' (row-major, flat or nested).",
        )
    return flat if flat.shape == shape else flat.reshape(shape)


def decode_request(
    body: bytes,
    header_length: int | None,
    *,
    max_id_chars: int = DEFAULT_MAX_ID_CHARS,
) -> InferenceRequest:
    """Parse an infer request body; ``header_length`` is Inference-Header-Content-Length, if sent.

    Each tensor is decoded as the datatype it was sent as; whether that is the model's datatype is the
    signature check's to say (``serve/signature.py``), with every other problem of the request, in one 400.
    ``max_id_chars`` bounds the echoed id.
    """
    if header_length is not None:
        if header_length > len(body):
            raise _fail(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes.")
        view = memoryview(body)
        head, binary, pos = _loads(view[:header_length]), view[header_length:], 0
    else:
        head, binary, pos = _loads(body), memoryview(b""), 0
    if not isinstance(head, dict):
        raise _fail("The request must be a JSON object with an 'inputs' list.")
    raw_inputs = head.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("The request needs 'inputs', a non-empty list of tensors.")
    inputs: dict[str, np.ndarray] = {}
    for item in raw_inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail("Every input must be an object with a 'name'.")
        name = item["name"]
        if name in inputs:
            raise _fail(f"Input '{name}' is given more than once.")
        dt = item.get("datatype")
        if dt not in NUMPY_OF:
            raise _fail(f"Input '{name}' has datatype {_brief(dt)}; expected one of {', '.join(NUMPY_OF)}.")
        shape, count = _shape(item, name, len(body))
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if type(size) is not int or size < 0 or pos + size > len(binary):
                raise _fail(f"Input '{name}' has binary_data_size {size!r}; the binary part has {len(binary) - pos}.")
            inputs[name] = _from_binary(binary[pos : pos + size], dt, shape, name)
            pos += size
        elif "data" in item:
            inputs[name] = _from_json(item["data"], dt, shape, count, name)
        else:
            raise _fail(f"Input '{name}' has neither 'data' nor parameters.binary_data_size.")
    if pos != len(binary):
        raise _fail(f"{len(binary) - pos} bytes of binary data follow the JSON but no input claims them.")
    top = head.get("parameters")
    return InferenceRequest(
        id=_request_id(head.get("id"), max_id_chars),
        inputs=inputs,
        outputs=_requested_outputs(head.get("outputs")),
        parameters=top if isinstance(top, dict) else None,
        binary_output=isinstance(top, dict) and top.get("binary_data_output") is True,
    )


def _request_id(value: Any, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(f"'id' must be a string; got {_brief(value)}.")
    if len(value) > max_chars:
        # The id is echoed in the reply and the logs; an unbounded one amplifies both.
        raise _fail(
            f"'id' is {len(value)} characters; this server accepts at most {max_chars}.",
            "Send a shorter id (a UUID or a counter), or raise guard.max_id_chars on the server.",
        )
    return value


def _requested_outputs(raw: Any) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _fail("'outputs' must be a list of {'name': ...} objects.")
    out = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail("Every requested output must be an object with a 'name'.")
        if item["name"] in seen:
            # Each repeat would be encoded again: a small request could ask for a huge reply.
            raise _fail(
                f"Output {_brief(item['name'])} is requested more than once; each output may be named once.",
                "List every output at most once in 'outputs'.",
            )
        seen.add(item["name"])
        params = item.get("parameters")
        binary = params.get("binary_data") if isinstance(params, dict) else None
        out.append(RequestedOutput(item["name"], binary if isinstance(binary, bool) else None))
    return tuple(out)


def _pack_bytes(array: np.ndarray) -> bytes:
    parts = []
    for element in array.reshape(-1):
        data = element.encode() if isinstance(element, str) else bytes(element)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _json_data(array: np.ndarray) -> Any:
    if array.dtype.kind in "OUS":
        return [e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e) for e in array.reshape(-1)]
    return array.reshape(-1)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    results: Mapping[str, np.ndarray],
    wanted: Sequence[RequestedOutput],
    binary_default: bool,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON length when binary parts follow it (else ``None``)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for req in wanted:
        array = results[req.name]
        entry: dict[str, Any] = {"name": req.name, "datatype": datatype_of_array(array), "shape": list(array.shape)}
        binary = binary_default if req.binary is None else req.binary
        if binary:
            blob = _pack_bytes(array) if array.dtype.kind in "OUS" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
