"""Run the app under uvicorn, draining in-flight requests on SIGTERM."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import uvicorn

from slipstream.serve.app import SlipstreamApp, create_app
from slipstream.serve.settings import ServeSettings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: report not-ready at once, stop accepting, let in-flight requests finish.

    uvicorn closes the listening sockets and idle connections, keeps connections with a request in
    progress until it is answered (up to ``timeout_graceful_shutdown``), then runs the app's
    lifespan shutdown, which stops the batchers.
    """

    def __init__(self, config: uvicorn.Config, app: SlipstreamApp) -> None:
        super().__init__(config)
        self.slipstream = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.slipstream.draining = True
        logging.getLogger("slipstream.serve").info("signal %s: draining in-flight requests", sig)
        super().handle_exit(sig, frame)


def configure_logging(level: int = logging.INFO) -> None:
    """Server events as JSON lines on stderr, beside the access log's own JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger("slipstream")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import orjson

        doc = {"level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key in ("model", "version", "event", "request_id"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def build_server(path: Path, settings: ServeSettings) -> DrainingServer:
    app = create_app(path, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        http="httptools",
        loop="uvloop",
        server_header=False,
    )
    return DrainingServer(config, app)


def serve(path: str | os.PathLike[str], settings: ServeSettings) -> None:
    """Serve until SIGTERM/SIGINT; returns after draining. Exits 1 when no model could start."""
    configure_logging()
    server = build_server(Path(path), settings)
    server.run()
    if not server.started:
        raise SystemExit(1)


def settings_from_options(options: Mapping[str, object], environ: Mapping[str, str]) -> ServeSettings:
    """Turn CLI options (flat) plus the environment into validated settings; keys are hashed here."""
    from pydantic import ValidationError

    from slipstream.errors import invalid_setting
    from slipstream.serve.guard import ADMIN_KEYS_ENV, API_KEYS_ENV, read_keys
    from slipstream.serve.settings import BatchSettings, GuardSettings

    opts = dict(options)
    api_file, admin_file = opts.pop("api_key_file", None), opts.pop("admin_key_file", None)
    batch_fields, guard_fields = set(BatchSettings.model_fields), set(GuardSettings.model_fields)
    batch = {k: opts.pop(k) for k in list(opts) if k in batch_fields}
    guard = {k: opts.pop(k) for k in list(opts) if k in guard_fields}
    guard["api_key_hashes"] = read_keys(api_file if isinstance(api_file, Path) else None, environ, API_KEYS_ENV)
    guard["admin_key_hashes"] = read_keys(admin_file if isinstance(admin_file, Path) else None, environ, ADMIN_KEYS_ENV)
    try:
        return ServeSettings.model_validate({**opts, "batching": batch, "guard": guard})
    except ValidationError as exc:
        raise invalid_setting(exc, "serve", hint="See `slipstream serve --help`.") from exc
