"""The gRPC front end: ``inference.GRPCInferenceService`` on a ``grpc.aio`` server, over the same core as HTTP.

Every RPC is a thin adapter: metadata becomes the headers the guard reads (``authorization: Bearer KEY``
or ``x-api-key: KEY``, as over HTTP), the message becomes an :class:`InferenceRequest`, and
:class:`~slipstream.serve.core.InferenceCore` does the rest (the same guard, batcher, monitor and
metrics). A refusal maps ``SlipstreamError.status_code`` to a gRPC status with the same text the REST
body carries; anything else is a bug: INTERNAL, naming the request id, with the traceback in the log.

The server runs on the app's event loop, started and stopped by its lifespan. Its message limits come
from the guard's body limit, never gRPC's defaults (4 MB in, unlimited out).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from slipstream.errors import ProtocolError, ServingError, SlipstreamError
from slipstream.serve.core import reason_of
from slipstream.serve.grpc import grpc_predict_v2_pb2 as pb
from slipstream.serve.grpc.convert import decode_request, encode_response, split_raw
from slipstream.serve.replies import refusal

if TYPE_CHECKING:
    from slipstream.serve.accesslog import AccessLog
    from slipstream.serve.core import InferenceCore
    from slipstream.serve.repository import ModelVersion

log = logging.getLogger("slipstream.serve")

SERVICE = "inference.GRPCInferenceService"
# HTTP status (SlipstreamError.status_code) -> gRPC status: the one mapping, as the HTTP layer has its own.
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
MIN_SEND_BYTES = 64 * 1024 * 1024  # replies may outgrow requests (a small batch in, large logits out)
FRAME_BYTES = 1024 * 1024  # the largest HTTP/2 frame a client may send (the protocol allows up to 16 MiB)
WINDOW_BYTES = 4 * 1024 * 1024  # what a stream may send before the server acknowledges it (its buffer)
# From this size on, ModelInfer takes raw tensors as views of the received bytes (convert.split_raw) instead
# of protobuf's two copies; below it, the copies cost less than walking the fields in Python (~2 µs).
SPLIT_FROM_BYTES = 32 * 1024
_Reply = TypeVar("_Reply")


def _client(peer: str) -> str:
    """The address in ``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5`` (the guard's caller id without keys)."""
    _, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if rest.count(":") >= 1 else rest
    return host.strip("[]") or "local"


def _headers(context: grpc.aio.ServicerContext) -> list[tuple[bytes, bytes]]:
    """The call's metadata as the (lower-case) header pairs the guard reads."""
    pairs = context.invocation_metadata() or ()
    return [(k.encode("latin-1"), v if isinstance(v, bytes) else v.encode("latin-1")) for k, v in pairs]


class _InternalError(ServingError):
    """A failure that is not a refusal: already logged with its traceback, answered INTERNAL."""


class GrpcFrontEnd:
    """The servicer; :meth:`start` binds it on ``settings.host:settings.grpc_port``."""

    def __init__(self, core: InferenceCore, *, access_log: AccessLog | None = None) -> None:
        self.core = core
        self.access_log = access_log
        self.port: int | None = None
        self._server: Any = None
        self._ids = itertools.count(1)
        self._boot = os.urandom(4).hex()

    # -- life -----------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Bind and serve; returns the port. A port taken by another process fails start-up loudly."""
        settings = self.core.settings
        limit = settings.guard.max_body_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, MIN_SEND_BYTES)),
            ("grpc.max_metadata_size", settings.http.max_header_bytes),
            # HTTP/2's defaults (16 KiB frames, a 64 KiB window grown by probing) cut a 1 MB tensor into 64
            # frames and as many window round trips: 66 req/s at c = 1 here, against 759 with these two.
            ("grpc.http2.max_frame_size", FRAME_BYTES),
            ("grpc.http2.lookahead_bytes", min(limit, WINDOW_BYTES)),
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.http.max_connections)
        handlers = self._handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)  # looked up without a string match per call
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        cause: RuntimeError | None = None
        try:
            port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
        except RuntimeError as exc:  # grpcio raises on a taken port; older ones returned 0
            port, cause = 0, exc
        if not port:
            raise ServingError(
                f"The gRPC server could not bind {settings.host}:{settings.grpc_port}.",
                hint="Pick a free --grpc-port, or stop what listens there.",
            ) from cause
        await server.start()
        self._server, self.port = server, port
        log.info("gRPC on %s:%d", settings.host, port, extra={"event": "grpc_started"})
        return int(port)

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs, give in-flight ones ``grace_s``, then cancel what is left."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    # -- plumbing -------------------------------------------------------------------------------------
    def _handlers(self) -> dict[str, Any]:
        """What protoc's ``add_GRPCInferenceServiceServicer_to_server`` registers, except that ModelInfer takes
        the message's bytes: their length bounds what its shapes may claim, without protobuf's ByteSize(),
        which re-encodes the message (1 ms for a 1 MB tensor here)."""
        typed: dict[str, Any] = {
            "ServerLive": pb.ServerLiveRequest,
            "ServerReady": pb.ServerReadyRequest,
            "ModelReady": pb.ModelReadyRequest,
            "ServerMetadata": pb.ServerMetadataRequest,
            "ModelMetadata": pb.ModelMetadataRequest,
            "RepositoryIndex": pb.RepositoryIndexRequest,
            "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
            "RepositoryModelUnload": pb.RepositoryModelUnloadRequest,
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(self, name), request_deserializer=message.FromString, response_serializer=_serialize
            )
            for name, message in typed.items()
        }
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.ModelInfer, response_serializer=_serialize)
        return handlers

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        run: Callable[[str, float], Awaitable[_Reply]],
        *,
        path_model: tuple[str, str | None] | None = None,
    ) -> _Reply:
        """Run one RPC: its request id, error mapping, counting (``core.finish``) and access log line."""
        core = self.core
        started = core.clock()
        request_id = self._request_id(_headers(context))
        error: SlipstreamError | None = None
        try:
            reply = await run(request_id, started)
        except SlipstreamError as exc:
            error = exc
        except Exception:
            log.exception("internal error in gRPC %s, request %s", method, request_id, extra={"request_id": request_id})
            error = _InternalError("internal")
        status = 200 if error is None else (error.status_code or 500)
        if error is not None:  # as over HTTP: a request that reached no model counts only as a rejection
            core.finish("", "", status, reason_of(error), started, path_model=path_model)
        self._log(method, request_id, status, context, started, path_model)
        if error is not None:
            await self._abort(context, error, request_id)
        return reply

    def _request_id(self, headers: list[tuple[bytes, bytes]]) -> str:
        sent = next((v.decode("latin-1") for k, v in headers if k == b"x-request-id"), None)
        return sent or f"{self._boot}-g{next(self._ids)}"

    async def _abort(self, context: grpc.aio.ServicerContext, exc: SlipstreamError, request_id: str) -> NoReturn:
        status, text, retry = refusal(exc, request_id, logged=isinstance(exc, _InternalError))
        code = STATUS_CODES.get(status, grpc.StatusCode.INTERNAL)
        trailing: list[tuple[str, str]] = [("x-request-id", request_id)]
        if retry is not None:
            trailing.append(("retry-after", str(max(1, round(retry)))))
        await context.abort(code, text, trailing_metadata=tuple(trailing))
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def _log(
        self,
        method: str,
        request_id: str,
        status: int,
        context: grpc.aio.ServicerContext,
        started: float,
        path_model: tuple[str, str | None] | None,
        entry: ModelVersion | None = None,
    ) -> None:
        if self.access_log is None:
            return
        self.access_log.write(
            {
                "request_id": request_id,
                "method": "GRPC",
                "path": f"/{SERVICE}/{method}",
                "status": status,
                "model": entry.name if entry else (path_model[0] if path_model else None),
                "version": entry.version if entry else (path_model[1] if path_model else None),
                "duration_ms": round((self.core.clock() - started) * 1000, 3),
                "client": _client(context.peer() or ""),
            }
        )

    def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        return self.core.authenticate(_headers(context), _client(context.peer() or ""))

    # -- RPCs (names and signatures fixed by the service) ---------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(request_id: str, started: float) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=self.core.live())

        return await self._call("ServerLive", context, run)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(request_id: str, started: float) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.core.ready())

        return await self._call("ServerReady", context, run)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(request_id: str, started: float) -> pb.ModelReadyResponse:
            self._authenticate(context)
            return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version or None))

        return await self._call("ModelReady", context, run, path_model=(request.name, request.version or None))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(request_id: str, started: float) -> pb.ServerMetadataResponse:
            self._authenticate(context)
            return pb.ServerMetadataResponse(**self.core.server_metadata())

        return await self._call("ServerMetadata", context, run)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(request_id: str, started: float) -> pb.ModelMetadataResponse:
            self._authenticate(context)
            meta = self.core.model_metadata(request.name, request.version or None)
            reply = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
            for spec in meta.inputs:
                reply.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            for spec in meta.outputs:
                reply.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            return reply

        return await self._call("ModelMetadata", context, run, path_model=(request.name, request.version or None))

    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        core = self.core
        started = core.clock()
        headers = _headers(context)
        request_id = self._request_id(headers)
        name, version = "", None
        entry: ModelVersion | None = None
        error: SlipstreamError | None = None
        try:
            caller = core.authenticate(headers, _client(context.peer() or ""))
            request, raw = _parse(data)
            name, version = request.model_name, request.model_version or None
            entry = core.model(name, version)
            inference = decode_request(request, max_id_chars=core.settings.guard.max_id_chars, size=len(data), raw=raw)
            response = await core.infer(entry, inference, request_id=request_id, caller=caller, started=started)
            reply = encode_response(response, raw=len(raw if raw is not None else request.raw_input_contents) > 0)
        except SlipstreamError as exc:
            error = exc
        except Exception:
            log.exception("internal error in gRPC ModelInfer, request %s", request_id, extra={"request_id": request_id})
            error = _InternalError("internal")
        status = 200 if error is None else (error.status_code or 500)
        core.finish(
            entry.name if entry else "",
            entry.version if entry else "",
            status,
            reason_of(error) if error is not None else None,
            started,
            path_model=(name, version) if name else None,
            entry=entry,
        )
        self._log("ModelInfer", request_id, status, context, started, (name, version) if name else None, entry)
        if error is not None:
            await self._abort(context, error, request_id)
        return reply

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def run(request_id: str, started: float) -> pb.RepositoryIndexResponse:
            self.core.authorize_admin(_headers(context))
            reply = pb.RepositoryIndexResponse()
            for row in self.core.repository_index(ready_only=request.ready):
                reply.models.add(
                    name=row["name"], version=row["version"], state=row["state"], reason=row.get("reason") or ""
                )
            return reply

        return await self._call("RepositoryIndex", context, run)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def run(request_id: str, started: float) -> pb.RepositoryModelLoadResponse:
            self.core.authorize_admin(_headers(context))
            await self.core.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", context, run)

    async def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def run(request_id: str, started: float) -> pb.RepositoryModelUnloadResponse:
            self.core.authorize_admin(_headers(context))
            await self.core.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._call("RepositoryModelUnload", context, run)


def _parse(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview] | None]:
    """The message, and its raw_input_contents as views of ``data`` when they were split off (else None)."""
    split = split_raw(data) if len(data) >= SPLIT_FROM_BYTES else None
    try:
        message: pb.ModelInferRequest = pb.ModelInferRequest.FromString(data if split is None else split[0])
    except DecodeError as exc:  # what a client's stub serialized always parses: this came from elsewhere
        raise ProtocolError(
            f"The request ({len(data)} bytes) is not a valid ModelInferRequest ({exc}).",
            hint="Send an inference.ModelInferRequest as grpc_predict_v2.proto defines it.",
        ) from exc
    return message, None if split is None else split[1]


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
