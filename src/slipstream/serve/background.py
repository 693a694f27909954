"""A real server in a background thread: for the demo, notebooks and tests (signals stay with the caller)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from slipstream.errors import SlipstreamError
from slipstream.serve.server import DrainingServer, build_server
from slipstream.serve.settings import ServeSettings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """``with ServerThread(path, settings) as server:`` serves until the block ends, then drains and stops."""

    def __init__(self, path: Path, settings: ServeSettings, *, start_timeout_s: float = 60.0) -> None:
        self.settings = settings.model_copy(update={"port": settings.port or free_port(settings.host)})
        self.server: DrainingServer = build_server(path, self.settings)
        self.app = self.server.slipstream
        self.thread = threading.Thread(target=self.server.run, name="slipstream-server", daemon=True)
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise SlipstreamError(
                    f"The server on {self.url} did not start within {self.start_timeout_s:.0f} s.",
                    hint="Run `slipstream serve` on the same path to see why (its log says which model failed).",
                )
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.settings.drain_timeout_s + 5)
