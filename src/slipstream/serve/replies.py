"""What the HTTP layer answers: replies, error mapping, and small request checks."""

from __future__ import annotations

from typing import Any

import orjson

from slipstream.errors import MethodNotAllowedError, ProtocolError, ServingError, SlipstreamError
from slipstream.serve.codec import RequestedOutput
from slipstream.serve.repository import ModelVersion

JSON_TYPE = (b"content-type", b"application/json")
HEADER_LENGTH = b"inference-header-content-length"
REJECTION_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


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


def error_reply(exc: SlipstreamError) -> Reply:
    text = exc.message if not exc.hint else f"{exc.message} Hint: {exc.hint}"
    reply = json_reply({"error": text}, exc.status_code or 500)
    retry = exc.retry_after_s if isinstance(exc, ServingError) else None
    if retry is not None:
        reply.headers.append((b"retry-after", str(max(1, round(retry))).encode()))
    return reply


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


def wanted_outputs(requested: tuple[RequestedOutput, ...] | None, entry: ModelVersion) -> tuple[RequestedOutput, ...]:
    if requested is None:
        return tuple(RequestedOutput(n, None) for n in entry.output_names)
    unknown = [r.name for r in requested if r.name not in entry.output_names]
    if unknown:
        raise ProtocolError(
            f"Requested outputs {unknown} do not exist; '{entry.name}' has [{', '.join(entry.output_names)}].",
            hint="Ask for outputs by the names GET /v2/models/{name} lists.",
        )
    return requested
