"""What the HTTP layer answers: replies, error mapping, and small request checks.

An error body tells the caller what failed in general terms; what only the operator should see (file
paths, digests, onnxruntime's own message) rides on the exception as a note (``add_note``) or is the
message of an unexpected failure, and goes to the server log under the request id the body names.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any

import orjson

from slipstream.artifact.tensor import TensorSpec
from slipstream.errors import (
    EngineError,
    InputError,
    MethodNotAllowedError,
    ProtocolError,
    ServingError,
    SlipstreamError,
)
from slipstream.serve.request import ModelMetadata

log = logging.getLogger("slipstream.serve")

JSON_TYPE = (b"content-type", b"application/json")
HEADER_LENGTH = b"inference-header-content-length"


class Reply:
    """What a handler answers: status, body, extra headers, and labels for the access log."""

    __slots__ = ("body", "content_type", "headers", "model", "reason", "status", "version")

    def __init__(self, body: bytes, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.body = body
        self.status = status
        self.headers = headers or []
        self.content_type = JSON_TYPE
        self.model = ""
        self.version = ""
        self.reason = ""  # a rejection reason more precise than the status (already counted by the monitor)


def json_reply(doc: Any, status: int = 200) -> Reply:
    return Reply(orjson.dumps(doc), status)


def refusal(exc: SlipstreamError, request_id: str, *, logged: bool = False) -> tuple[int, str, float | None]:
    """What every front end answers for ``exc``: status, text, retry-after; its private detail is logged.

    REST and gRPC both call this, so a refusal reads the same word for word on either protocol. A server
    fault's message and a refusal's notes are for the operator: they go to the log under the request id,
    never to the client (``logged``: the caller already logged the fault with its traceback).
    """
    status = exc.status_code or 500
    notes: list[str] = getattr(exc, "__notes__", [])
    extra = {"request_id": request_id, "status": status}
    if exc.status_code in (None, 500):  # the server's fault: its message is for the operator
        if not logged:
            log.error("request %s failed: %s", request_id, "; ".join([str(exc), *notes]), extra=extra)
        text = f"Internal error while serving the request (request id {request_id}); the server log has the detail."
    else:
        text = exc.message if not exc.hint else f"{exc.message} Hint: {exc.hint}"
        if notes:
            log.warning(
                "request %s answered %d: %s (%s)", request_id, status, exc.message, "; ".join(notes), extra=extra
            )
            text += f" (request id {request_id}; the server log has the detail)"
    return status, text, exc.retry_after_s if isinstance(exc, ServingError) else None


def error_reply(exc: SlipstreamError, request_id: str) -> Reply:
    """The JSON reply for ``exc`` (see :func:`refusal`)."""
    status, text, retry = refusal(exc, request_id)
    reply = json_reply({"error": text}, status)
    if retry is not None:
        reply.headers.append((b"retry-after", str(max(1, round(retry))).encode()))
    return reply


# onnxruntime's words for a run that failed on what the request held, and ours for the client. Its
# exceptions are untyped here; INVALID_ARGUMENT is the status its kernels give a bad input value.
_INPUT_FAULTS = (
    ("out of data bounds", "an id or index is outside the table it indexes"),
    ("out of range", "a value is outside the range the model accepts"),
    ("broadcast", "the input's sizes do not fit together inside the model"),
    ("invalid dimensions", "an input's shape does not fit the model"),
    ("invalid input shape", "an input's shape does not fit the model"),
)


def client_fault(exc: SlipstreamError, specs: tuple[TensorSpec, ...]) -> SlipstreamError:
    """``exc`` as a 400 when onnxruntime failed on what the request held; any other error unchanged.

    The body says what the model takes (ranges and limits where the graph told us); onnxruntime's own
    text, with its node names and source paths, goes to the log under the request id as a note.
    """
    cause = exc.__cause__
    if type(exc) is not EngineError or cause is None:  # a subclass (no provider) is not about the input
        return exc
    if not type(cause).__module__.startswith("onnxruntime"):
        return exc
    text = str(cause)
    what = next((ours for theirs, ours in _INPUT_FAULTS if theirs in text.lower()), None)
    if what is None and type(cause).__name__ != "InvalidArgument":
        return exc  # a failure that says nothing about the input is the server's (500, logged)
    fault = InputError(
        f"The model could not run on this input: {what or 'onnxruntime refused the input values'}. "
        f"It takes {'; '.join(_takes(s) for s in specs)}.",
        hint="Send inputs within these shapes and ranges (GET /v2/models/{name} lists them).",
    )
    fault.add_note(f"onnxruntime: {text.strip()}")
    fault.__cause__ = exc
    return fault


def _takes(spec: TensorSpec) -> str:
    text = f"'{spec.name}' {spec.dtype} {spec.shape_text()}"
    if spec.value_range is not None:
        text += f" with values in [{spec.value_range[0]:g}, {spec.value_range[1]:g}]"
    for axis, limit in enumerate(spec.max_shape or ()):
        if limit is not None:
            text += f", axis {axis} at most {limit}"
    return text


def tensor_parameters(spec: TensorSpec) -> dict[str, float | int]:
    """What the metadata endpoint adds to an input's OIP description, as flat OIP ``parameters`` (scalars):
    the value range, each bounded axis's limit, and a quantized input's scale and zero point."""
    out: dict[str, float | int] = {}
    if spec.value_range is not None:
        low, high = spec.value_range
        integral = spec.dtype.startswith(("int", "uint")) and low.is_integer() and high.is_integer()
        out["value_min"], out["value_max"] = (int(low), int(high)) if integral else (low, high)
    for axis, limit in enumerate(spec.max_shape or ()):
        if limit is not None:
            out[f"max_size_axis_{axis}"] = limit
    if spec.quantization is not None:
        out["quantization_scale"] = spec.quantization.scale
        out["quantization_zero_point"] = spec.quantization.zero_point
    return out


def allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowedError(f"This endpoint answers {allowed}, not {method}.", hint=f"Use {allowed}.")


def header_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k == HEADER_LENGTH:
            if not v.isdigit():
                raise ProtocolError(f"Inference-Header-Content-Length must be a number; got {v!r}.")
            return int(v)
    return None


@functools.cache
def openapi_document() -> bytes:
    """``openapi.json`` beside this module: the REST API this server speaks (read once, on first ask)."""
    return resources.files("slipstream.serve").joinpath("openapi.json").read_bytes()


async def read_body(
    receive: Callable[[], Awaitable[Mapping[str, Any]]],
    headers: list[tuple[bytes, bytes]],
    check_size: Callable[[int], None],
) -> bytes:
    """The whole request body, refused (413) as soon as its declared or received size passes the limit."""
    for k, v in headers:
        if k == b"content-length" and v.isdigit():
            check_size(int(v))
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        check_size(len(body))
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        check_size(size)
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(body: bytes) -> dict[str, Any]:
    """An admin request's body: a JSON object, or nothing (an empty object)."""
    try:
        doc = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"The request body is not valid JSON ({exc}).") from exc
    if not isinstance(doc, dict):
        raise ProtocolError("The request body must be a JSON object.")
    return doc


def metadata_doc(meta: ModelMetadata) -> dict[str, Any]:
    """GET /v2/models/{name} as JSON: parameters appear only where the graph told us something."""
    tensors = {
        side: [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.shape),
                **({"parameters": t.parameters} if t.parameters else {}),
            }
            for t in group
        ]
        for side, group in (("inputs", meta.inputs), ("outputs", meta.outputs))
    }
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform, **tensors}
