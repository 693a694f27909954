"""uvicorn's httptools protocol with limits: header bytes and count, request line, read timeouts, connections.

Why a subclass and not h11: httptools (llhttp, in C) parses a request several times faster than h11 (pure
Python), and that parser cost is most of what a small-model request spends in the HTTP layer. What httptools
lacks is bounds: it accumulates a header line that never ends (``bytes +=`` inside the parser, so also
quadratic), uvicorn accumulates the URL, and nothing times out a slow client. So this class

* counts the raw bytes received while a request head is incomplete and answers 431 once they pass
  ``max_header_bytes`` (checked after each socket read: at most the limit plus one read is ever buffered);
* counts header lines in ``on_header`` (431) and the URL in ``on_url`` (414), raising out of the parser;
* records when the head and the body began and when the last body piece came; ``sweep`` (called by the
  server ten times a second, see ``DrainingServer.on_tick``) answers 408 and closes past a read timeout.
  One sweep over the connections costs less than a timer per request, which the fast path never pays;
* answers 503 with Retry-After to a connection beyond ``max_connections``, or opened while the server drains,
  once its request has been read (closing before reading would reset it instead).

A refusal is a JSON body like the app's other errors (``{"error": "... Hint: ..."}``) with
``connection: close``, and a rate-limited warning in the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from slipstream.serve.settings import HttpSettings

log = logging.getLogger("slipstream.serve.http")

# Where a connection is in its current request.
_HEAD = 0  # reading a request head (or waiting for the first byte of a new connection)
_BODY = 1  # head done, reading the body
_WAIT = 2  # request read; the app answers, then uvicorn's keep-alive timer runs until the next request
_REFUSING = 3  # over the connection cap, or draining: 503 once the request comes in
_CLOSED = 4


class Gate:
    """What the connections of one server share: the limits, and whether the server is draining."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.draining = False


class _StopParsingError(Exception):
    """Raised in a parser callback to stop parsing; ``data_received`` answers the refusal recorded before."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One connection. Build the class for a server with :func:`protocol_class`, which sets ``gate``."""

    gate: Gate

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits = self.gate.settings
        self.max_header_bytes = limits.max_header_bytes
        self.max_header_count = limits.max_header_count
        self.max_request_line_bytes = limits.max_request_line_bytes
        # uvicorn's Config takes whole seconds; the setting is a float (a test uses a fraction of a second).
        self.timeout_keep_alive = self.limits.keep_alive_timeout_s  # type: ignore[assignment]
        self.phase = _HEAD
        self.since = 0.0  # when the current head (or body) began
        self.last_read = 0.0  # when the last body piece came
        self.head_bytes = 0
        self.header_count = 0
        self.refusal: tuple[int, str, str] | None = None
        self.refuse_timer: asyncio.TimerHandle | None = None

    # -- connection --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over_cap = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        self.since = self.loop.time()
        if over_cap or self.gate.draining:
            self.phase = _REFUSING
            # A client that never sends its request is not kept waiting for it (nor holds a drain up).
            self.refuse_timer = self.loop.call_later(min(2.0, self.limits.header_timeout_s), self.close_quietly)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = _CLOSED
        if self.refuse_timer is not None:
            self.refuse_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.phase != _REFUSING:  # a refused connection still gets its 503 (or its short timer)
            super().shutdown()

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == _REFUSING:
            busy = (
                "shutting down" if self.gate.draining else f"at its limit of {self.limits.max_connections} connections"
            )
            self.refuse(503, f"The server is {busy}.", "Retry after the Retry-After interval.", retry=True)
            return
        if phase == _CLOSED:
            return
        self._unset_keepalive_if_required()
        if phase != _BODY:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self.refusal is not None:
                self.refuse(*self.refusal)
            else:
                log.warning("invalid HTTP request from %s: answered 400", _client(self.client))
                self.send_400_response("Invalid HTTP request received.")
                self.phase = _CLOSED
            return
        if self.phase == _HEAD and self.head_bytes > self.max_header_bytes:
            self.refuse(
                431,
                f"The request head exceeds {self.max_header_bytes} bytes.",
                "Send fewer or shorter headers.",
            )

    # -- parser callbacks ----------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.phase != _HEAD:
            self.phase = _HEAD
            self.since = self.loop.time()
        self.header_count = 0
        super().on_message_begin()

    # on_url, on_header, on_body and on_message_complete repeat uvicorn's few lines instead of calling super():
    # they run several times per request, and the call costs more than the check.
    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_request_line_bytes:
            self.refusal = (
                414,
                f"The request target exceeds {self.max_request_line_bytes} bytes.",
                "Send long inputs in the body, not the URL.",
            )
            raise _StopParsingError

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.max_header_count:
            self.refusal = (431, f"The request has more than {self.max_header_count} headers.", "Send fewer headers.")
            raise _StopParsingError
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.phase = _BODY
        self.since = self.last_read = self.loop.time()
        self.head_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.last_read = self.loop.time()
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self.phase = _WAIT
        self.head_bytes = 0
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    # -- timeouts and refusals -------------------------------------------------------------------------
    def check_deadline(self, now: float) -> None:
        """Close this connection if its head or body has taken longer than the limits allow."""
        limits = self.limits
        if self.phase == _HEAD and self.flow.read_paused:
            self.since = now  # a pipelined request waits while uvicorn does not read: not the client's delay
        elif self.phase == _HEAD and now - self.since > limits.header_timeout_s:
            if self.head_bytes == 0:  # a connection that never sent anything: nothing to answer
                self.close_quietly()
                return
            self.refuse(
                408,
                f"The request headers did not arrive within {limits.header_timeout_s:g} s.",
                "Send the whole request head at once.",
            )
        elif self.phase == _BODY:
            if self.flow.read_paused:  # the server is not reading (back-pressure): not the client's delay
                self.last_read = now
            elif now - self.last_read > limits.body_idle_timeout_s or now - self.since > limits.body_timeout_s:
                self.refuse(
                    408,
                    f"The request body did not arrive in time (at most {limits.body_idle_timeout_s:g} s between "
                    f"pieces, {limits.body_timeout_s:g} s in all).",
                    "Send the body as fast as the headers.",
                )

    def close_quietly(self) -> None:
        self.phase = _CLOSED
        if not self.transport.is_closing():
            self.transport.close()

    def refuse(self, status: int, message: str, hint: str, retry: bool = False) -> None:
        """Answer ``status`` with a JSON error and close; only close when a response is already under way."""
        was = self.phase
        self.phase = _CLOSED
        if self.transport.is_closing():
            return
        log.warning("refused a request from %s: %d %s", _client(self.client), status, message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Only the request whose body is being read may be answered here; any other response is its own.
            if was != _BODY or cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True  # the app's receive() sees a disconnect, its send() is dropped
            cycle.message_event.set()
        body = orjson.dumps({"error": f"{message} Hint: {hint}"})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: application/json\r\nconnection: close\r\n")
        if retry:
            head.append(b"retry-after: %d\r\n" % max(1, round(self.limits.retry_after_s)))
        head += [b"content-length: %d\r\n\r\n" % len(body), body]
        self.transport.write(b"".join(head))
        self.transport.close()


def _client(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def protocol_class(settings: HttpSettings) -> tuple[type[LimitedHttpToolsProtocol], Gate]:
    """A protocol class for one server (uvicorn builds one instance per connection) and its shared gate."""
    gate = Gate(settings)
    cls = type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"gate": gate})
    return cls, gate


def sweep(connections: set[Any], now: float) -> None:
    """Apply the read timeouts to every connection of a server (uvicorn's ``server_state.connections``)."""
    for connection in list(connections):
        if isinstance(connection, LimitedHttpToolsProtocol):
            connection.check_deadline(now)
