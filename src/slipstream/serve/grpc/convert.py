"""``ModelInferRequest`` in, :class:`InferenceRequest` out, and back: the gRPC wire format and nothing else.

A tensor comes either typed (``contents``, one repeated field per datatype) or raw
(``raw_input_contents``: little-endian bytes, one entry per input, in the order of ``inputs``); FP16
has no typed field, so it only travels raw. The checks and their texts are the HTTP codec's own
(``slipstream.serve.codec``), called with the same arguments, so a malformed tensor is refused with the
same words over both protocols. The reply is raw when the request was (as Triton answers), typed
otherwise, unless an output has no typed field (FP16): then all of it is raw, as the protocol forbids
mixing the two in one reply.

A large request skips protobuf's copies of its tensors: :func:`split_raw` walks the message's top-level
fields (a few per request) and hands ``raw_input_contents`` on as views of the received bytes, so only the
small rest of the message goes through the parser. Parsing all of it would copy each tensor twice (into
the parser's arena, then out as a new ``bytes``): for a 1 MiB tensor that is two 1 MiB copies and, as the
allocator hands the pages back between calls, 512 fresh page faults per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from slipstream.errors import ProtocolError
from slipstream.serve.codec import (
    NUMPY_OF,
    _brief,
    _from_binary,
    _from_json,
    _pack_bytes,
    _request_id,
    _shape,
    datatype_of_array,
)
from slipstream.serve.grpc import grpc_predict_v2_pb2 as pb
from slipstream.serve.request import InferenceRequest, InferenceResponse, RequestedOutput

# The typed field carrying each datatype (InferTensorContents); FP16 and BF16 travel only raw.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
RAW_TAG = (7 << 3) | 2  # ModelInferRequest.raw_input_contents: field 7, length-delimited
_HINT = "See the Open Inference Protocol v2 gRPC ModelInferRequest (raw_input_contents or typed contents)."


def _fail(message: str, hint: str = _HINT) -> ProtocolError:
    return ProtocolError(message, hint=hint)


def parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as plain values (bool, int, str or float); unset ones are left out."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(value, which)
    return out


def split_raw(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """``data`` (a serialized ModelInferRequest) without its ``raw_input_contents``, and those contents as
    views of ``data``, in order; no tensor byte is copied. None where ``data`` is not well-formed wire format
    (or uses groups): the full parser then decides, and words the refusal."""
    view = memoryview(data)
    kept: list[memoryview] = []
    raw: list[memoryview] = []
    pos, end, run = 0, len(data), 0  # run: where the current stretch of kept fields began
    try:
        while pos < end:
            start = pos
            tag, pos = _varint(data, pos)
            wire = tag & 7
            if wire == 2:
                length, pos = _varint(data, pos)
                stop = pos + length
            elif wire == 0:
                stop = _varint(data, pos)[1]
            elif wire == 1 or wire == 5:
                stop = pos + (8 if wire == 1 else 4)
            else:
                return None
            if stop > end or tag >> 3 == 0:
                return None
            if tag == RAW_TAG:
                if run < start:
                    kept.append(view[run:start])
                raw.append(view[pos:stop])
                run = stop
            pos = stop
    except IndexError:  # a varint running past the end
        return None
    if not raw:
        return data, raw
    kept.append(view[run:end])
    return b"".join(kept), raw


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` and the position after it; IndexError past the end."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise IndexError("varint longer than 10 bytes")


def decode_request(
    message: pb.ModelInferRequest,
    *,
    max_id_chars: int,
    size: int,
    raw: Sequence[bytes | memoryview] | None = None,
) -> InferenceRequest:
    """The typed request ``message`` holds; ``size`` is its wire size (bounds what a shape may claim), and
    ``raw`` its raw_input_contents when :func:`split_raw` took them out (else the message's own).

    Raises ProtocolError (400) for anything the protocol does not allow, with the HTTP codec's texts.
    """
    if raw is None:
        raw = message.raw_input_contents
    if not message.inputs:
        raise _fail("The request needs 'inputs', a non-empty list of tensors.")
    if raw and len(raw) != len(message.inputs):
        raise _fail(
            f"The request has {len(raw)} raw_input_contents for {len(message.inputs)} inputs.",
            "Send one raw_input_contents entry per input, in the order of 'inputs' (or typed contents for all).",
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name, dt = tensor.name, tensor.datatype
        if name in inputs:
            raise _fail(f"Input '{name}' is given more than once.")
        if dt not in NUMPY_OF:
            raise _fail(f"Input '{name}' has datatype {_brief(dt)}; expected one of {', '.join(NUMPY_OF)}.")
        shape, count = _shape({"shape": list(tensor.shape)}, name, size)
        if raw:
            if tensor.HasField("contents"):
                raise _fail(
                    f"Input '{name}' has typed contents, but the request also carries raw_input_contents.",
                    "Send every input raw, or every input typed; the protocol does not mix them in one request.",
                )
            array = _from_binary(memoryview(raw[index]), dt, shape, name)
            if not array.flags.aligned:
                # A view of the message at an odd offset: onnxruntime would take an aligned copy element by
                # element (280 µs for 1 MiB FP32 here); one memcpy costs 25.
                array = array.copy()
            inputs[name] = array
        else:
            inputs[name] = _typed(tensor.contents, dt, shape, count, name)
    return InferenceRequest(
        id=_request_id(message.id or None, max_id_chars),
        inputs=inputs,
        outputs=_requested_outputs(message.outputs),
        parameters=parameters(message.parameters) if message.parameters else None,
    )


def _typed(contents: pb.InferTensorContents, dt: str, shape: tuple[int, ...], count: int, name: str) -> np.ndarray:
    field = CONTENTS_FIELD.get(dt)
    if field is None:
        raise _fail(
            f"Input '{name}' is {dt}, which travels only as binary data.",
            "Send it in raw_input_contents (little-endian bytes, row-major).",
        )
    values: list[Any] = list(getattr(contents, field))
    if dt == "BYTES":
        values = [_text(v, i, name) for i, v in enumerate(values)]
    # The codec's JSON path: the same range check (an INT8 sent as int_contents 300 is refused, never
    # wrapped) and the same count-against-shape text as a REST request's 'data'.
    return _from_json(values, dt, shape, count, name)


def _text(value: bytes, index: int, name: str) -> str:
    try:
        return value.decode("utf-8")  # onnxruntime string tensors take str
    except UnicodeDecodeError as exc:
        raise _fail(f"Input '{name}': BYTES element {index} is not UTF-8 text ({exc}).") from exc


def _requested_outputs(
    outputs: Any,
) -> tuple[RequestedOutput, ...] | None:
    if not outputs:
        return None  # the protocol: none listed means every output
    seen: set[str] = set()
    wanted = []
    for item in outputs:
        if item.name in seen:
            # Each repeat would be encoded again: a small request could ask for a huge reply.
            raise _fail(
                f"Output {_brief(item.name)} is requested more than once; each output may be named once.",
                "List every output at most once in 'outputs'.",
            )
        seen.add(item.name)
        wanted.append(RequestedOutput(item.name, None))
    return tuple(wanted)


def encode_response(response: InferenceResponse, *, raw: bool) -> pb.ModelInferResponse:
    """The reply: raw when ``raw`` (the request was) or when an output has no typed field, else typed."""
    arrays = [(want.name, response.outputs[want.name]) for want in response.wanted]
    kinds = [datatype_of_array(array) for _, array in arrays]
    raw = raw or any(kind not in CONTENTS_FIELD for kind in kinds)
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id or "")
    for (name, array), kind in zip(arrays, kinds, strict=True):
        tensor = message.outputs.add(name=name, datatype=kind, shape=array.shape)
        if raw:
            blob = _pack_bytes(array) if kind == "BYTES" else np.ascontiguousarray(array).tobytes()
            message.raw_output_contents.append(blob)
        elif kind == "BYTES":
            tensor.contents.bytes_contents.extend(
                e.encode() if isinstance(e, str) else bytes(e) for e in array.reshape(-1)
            )
        else:
            getattr(tensor.contents, CONTENTS_FIELD[kind]).extend(array.reshape(-1).tolist())
    return message
