"""``ModelInferRequest`` in, :class:`InferenceRequest` out, and back: the gRPC wire format and nothing else.

A tensor comes either typed (``contents``, one repeated field per datatype) or raw
(``raw_input_contents``: little-endian bytes, one entry per input, in the order of ``inputs``); FP16
has no typed field, so it only travels raw. The checks and their texts are the HTTP codec's own
(``slipstream.serve.codec``), called with the same arguments, so a malformed tensor is refused with the
same words over both protocols. The reply is raw when the request was (as Triton answers), typed
otherwise, unless an output has no typed field (FP16): then all of it is raw, as the protocol forbids
mixing the two in one reply.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def decode_request(message: pb.ModelInferRequest, *, max_id_chars: int, size: int) -> InferenceRequest:
    """The typed request ``message`` holds; ``size`` is its wire size (bounds what a shape may claim).

    Raises ProtocolError (400) for anything the protocol does not allow, with the HTTP codec's texts.
    """
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
            inputs[name] = _from_binary(memoryview(raw[index]), dt, shape, name)
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
