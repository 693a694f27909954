"""Run the app under uvicorn with the HTTP limits (serve.http_limits), draining in-flight requests on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, Literal

import uvicorn

from slipstream.logs import RateLimitFilter
from slipstream.serve.app import SlipstreamApp, create_app
from slipstream.serve.http_limits import Gate, protocol_class, sweep
from slipstream.serve.settings import ServeSettings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: report not-ready at once, answer new connections 503, let in-flight requests finish.

    The listening socket stays open while in-flight requests finish, so a connection that arrives during
    the drain is read and answered 503 with Retry-After (a load balancer retries it elsewhere) instead of
    being reset; then uvicorn closes the listener and idle connections, and runs the app's lifespan
    shutdown, which stops the batchers. The process then exits 0: uvicorn's own handler would re-raise the
    signal after the drain, so a supervisor saw -15 (killed) for a clean stop.
    """

    def __init__(self, config: uvicorn.Config, app: SlipstreamApp, gate: Gate | None = None) -> None:
        super().__init__(config)
        self.slipstream = app
        self.gate = gate
        self.on_started: Callable[[], None] | None = None  # once serving (serve.workers tells its parent)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not super(): it records the signal to re-raise once the server has stopped.
        self.slipstream.draining = True
        logging.getLogger("slipstream.serve").info("signal %s: draining in-flight requests", sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop without waiting
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.gate is not None:
            sweep(self.server_state.connections, asyncio.get_running_loop().time())
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.slipstream.draining = True
        if self.gate is not None:
            self.gate.draining = True
            loop = asyncio.get_running_loop()
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle ones close; one with a request in flight closes after answering
            deadline = loop.time() + (self.config.timeout_graceful_shutdown or 30)
            while self.server_state.tasks and not self.force_exit and loop.time() < deadline:
                sweep(self.server_state.connections, loop.time())
                await asyncio.sleep(0.05)
        await super().shutdown(sockets)


def configure_logging(level: int = logging.INFO, repeat_interval_s: float = 10.0, worker: int | None = None) -> None:
    """Server events as JSON lines on stderr, beside the access log's own JSON lines.

    A warning (or worse) that repeats is written at most once per ``repeat_interval_s`` with the count of
    the ones held back (slipstream.logs.RateLimitFilter): a persistent fault or a flood of bad requests
    must not flood the log. uvicorn's own error logger gets the same filter.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    handler.addFilter(RateLimitFilter(repeat_interval_s))
    if worker is not None:  # serve --workers N: each line says which worker (its pid) wrote it
        handler.addFilter(_Worker(worker))
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.filters[:] = [f for f in uvicorn_errors.filters if not isinstance(f, RateLimitFilter)]
    uvicorn_errors.addFilter(RateLimitFilter(repeat_interval_s))
    root = logging.getLogger("slipstream")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _Worker(logging.Filter):
    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.pid
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import orjson

        doc = {"level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        # "worker": serve --workers N; observed...pending: the monitor's accounting when a server closes it
        for key in ("model", "version", "event", "request_id", "repeated", "worker", "observed", "written", "dropped",
                    "lost", "pending"):  # fmt: skip
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def build_server(
    path: Path,
    settings: ServeSettings,
    *,
    access_sink: BinaryIO | None = None,
    wrap: Callable[[SlipstreamApp], Any] | None = None,
) -> DrainingServer:
    """The server for ``path``; ``wrap``: the ASGI app uvicorn runs, around the app (serve.fleet)."""
    app = create_app(path, settings, access_sink=access_sink)
    limits = settings.http
    http: type[asyncio.Protocol] | Literal["httptools"] = "httptools"
    gate = None
    if limits.limits:
        http, gate = protocol_class(limits)
    config = uvicorn.Config(
        app if wrap is None else wrap(app),
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        http=http,
        loop="uvloop",
        server_header=False,
        timeout_keep_alive=max(1, round(limits.keep_alive_timeout_s)),  # the limited protocol uses the float
    )
    return DrainingServer(config, app, gate)


def serve(path: str | os.PathLike[str], settings: ServeSettings, workers: int = 1) -> None:
    """Serve until SIGTERM/SIGINT; returns after draining. Exits 1 when no model could start.

    ``workers`` > 1: that many serving processes on the port, supervised by this one (serve.workers)."""
    if workers > 1:
        from slipstream.serve.workers import serve_workers

        raise SystemExit(serve_workers(Path(path), settings, workers))
    configure_logging()
    server = build_server(Path(path), settings)
    server.run()
    if not server.started:
        raise SystemExit(1)


def settings_from_options(options: Mapping[str, object], environ: Mapping[str, str]) -> ServeSettings:
    """Turn CLI options (flat, but ``monitor`` nested like MonitorServing) plus the environment into validated
    settings; keys are hashed here."""
    from pydantic import ValidationError

    from slipstream.errors import invalid_setting
    from slipstream.serve.guard import ADMIN_KEYS_ENV, API_KEYS_ENV, read_keys
    from slipstream.serve.settings import BatchSettings, GuardSettings, HttpSettings

    opts = dict(options)
    api_file, admin_file = opts.pop("api_key_file", None), opts.pop("admin_key_file", None)
    batch_fields, guard_fields = set(BatchSettings.model_fields), set(GuardSettings.model_fields)
    batch = {k: opts.pop(k) for k in list(opts) if k in batch_fields}
    guard = {k: opts.pop(k) for k in list(opts) if k in guard_fields}
    # The CLI passes the HTTP limits flat with an "http_" prefix: http_max_header_bytes -> http.max_header_bytes
    http = {k[5:]: opts.pop(k) for k in list(opts) if k.startswith("http_") and k[5:] in HttpSettings.model_fields}
    guard["api_key_hashes"] = read_keys(api_file if isinstance(api_file, Path) else None, environ, API_KEYS_ENV)
    guard["admin_key_hashes"] = read_keys(admin_file if isinstance(admin_file, Path) else None, environ, ADMIN_KEYS_ENV)
    try:
        settings = ServeSettings.model_validate({**opts, "batching": batch, "guard": guard, "http": http})
    except ValidationError as exc:
        raise invalid_setting(exc, "serve", hint="See `slipstream serve --help`.") from exc
    # "monitor" comes nested, shaped like MonitorServing; a flag such as --accuracy-drop-alert sets one check's
    # threshold, and the alert rules that watch that check take the same number.
    return settings.model_copy(update={"monitor": settings.monitor.rules_follow_checks()})
