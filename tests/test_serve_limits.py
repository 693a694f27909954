"""The HTTP limits of a real server on loopback, driven over raw sockets; and the log rate limiter."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from slipstream.errors import ConfigError
from slipstream.logs import RateLimitFilter
from slipstream.serve.settings import HttpSettings, ServeSettings
from tests.serve_support import ServerThread, add_version

LIMITS = HttpSettings(
    max_header_bytes=4096,
    max_header_count=20,
    max_request_line_bytes=1024,
    header_timeout_s=0.6,
    body_idle_timeout_s=0.6,
    body_timeout_s=3.0,
    keep_alive_timeout_s=0.6,
    max_connections=6,
)
HANG_GUARD_S = 15.0  # only stops a broken server from hanging the test; the limits above are far shorter


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    work = tmp_path_factory.mktemp("limits")
    add_version(work / "repo", "mlp", "1", work)
    with ServerThread(work / "repo", ServeSettings(port=0, access_log=False, http=LIMITS)) as running:
        yield running


def _connect(server: ServerThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.settings.port), timeout=HANG_GUARD_S)


def _read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    raw = b""
    try:
        while chunk := conn.recv(65536):
            raw += chunk
    except ConnectionResetError:
        pass
    return raw


def _status_and_body(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _refused(server: ServerThread, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    with _connect(server) as conn:
        conn.sendall(request)
        raw = _read_all(conn)
    status, headers, body = _status_and_body(raw)
    assert headers[b"connection"] == b"close"
    assert "Hint:" in json.loads(body)["error"]
    return status, headers, body


def test_a_normal_request_is_served_and_kept_alive(server: ServerThread) -> None:
    with _connect(server) as conn:
        for _ in range(2):
            conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = conn.recv(65536)
            assert raw.startswith(b"HTTP/1.1 200 ")
            assert b"connection: close" not in raw.lower()


def test_an_unterminated_header_over_the_limit_is_answered_431_without_waiting_for_its_end(
    server: ServerThread,
) -> None:
    # Just over the limit and no blank line: the server must not wait for the header to end.
    status, _, body = _refused(server, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000)
    assert status == 431
    assert b"4096 bytes" in body


def test_too_many_headers_are_answered_431(server: ServerThread) -> None:
    lines = b"".join(b"X-H%d: 1\r\n" % i for i in range(25))
    status, _, body = _refused(server, b"GET / HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert status == 431
    assert b"more than 20 headers" in body


def test_a_long_request_line_is_answered_414(server: ServerThread) -> None:
    status, _, _ = _refused(server, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414


def test_a_slowloris_connection_is_answered_408_and_closed(server: ServerThread) -> None:
    with _connect(server) as conn:
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        raw = _read_all(conn)
    status, _, body = _status_and_body(raw)
    assert status == 408
    assert b"headers did not arrive" in body


def test_a_connection_that_sends_nothing_is_closed(server: ServerThread) -> None:
    with _connect(server) as conn:
        assert _read_all(conn) == b""


def test_a_slow_body_is_answered_408_and_closed(server: ServerThread) -> None:
    with _connect(server) as conn:
        conn.sendall(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs": '
        )
        raw = _read_all(conn)
    status, _, body = _status_and_body(raw)
    assert status == 408
    assert b"body did not arrive" in body


def test_an_idle_kept_alive_connection_is_closed(server: ServerThread) -> None:
    with _connect(server) as conn:
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        first = conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert _read_all(conn) == b""  # closed by the keep-alive timeout, nothing more sent


def test_a_connection_over_the_cap_is_answered_503_with_retry_after(server: ServerThread) -> None:
    connections = server.server.server_state.connections
    held = [_connect(server) for _ in range(LIMITS.max_connections)]
    try:
        for conn in held:
            conn.sendall(b"GET / HTTP/1.1\r\n")  # a head in progress: held open until the header timeout
        deadline = time.monotonic() + HANG_GUARD_S
        while len(connections) < LIMITS.max_connections:
            assert time.monotonic() < deadline, "the server never accepted the held connections"
            time.sleep(0.01)
        status, headers, body = _refused(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503
        assert headers[b"retry-after"] == b"1"
        assert b"limit of 6 connections" in body
    finally:
        for conn in held:
            conn.close()


def test_the_limits_are_serve_options_routed_into_the_http_settings() -> None:
    from typer.testing import CliRunner

    from slipstream.cli.app import app
    from slipstream.serve.server import settings_from_options

    shown = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--max-header-bytes", "--max-header-count", "--max-request-line-bytes", "--header-timeout",
                   "--body-idle-timeout", "--body-timeout", "--keep-alive-timeout", "--max-connections"):  # fmt: skip
        assert option in shown
    settings = settings_from_options({"http_max_header_bytes": 2048, "http_header_timeout_s": 2.5}, {})
    assert (settings.http.max_header_bytes, settings.http.header_timeout_s) == (2048, 2.5)
    assert settings.http.max_connections == HttpSettings().max_connections
    with pytest.raises(ConfigError, match=r"http\.max_header_bytes"):
        settings_from_options({"http_max_header_bytes": 10}, {})


# -- the log rate limiter ------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str, *args: object, level: int = logging.WARNING, name: str = "slipstream.x") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_warning_passes_once_per_interval_then_says_how_often_it_repeated() -> None:
    clock = _Clock()
    limiter = RateLimitFilter(10.0, clock=clock)
    assert limiter.filter(_record("disk full writing %s", "a.db"))
    passed = [limiter.filter(_record("disk full writing %s", f"{i}.db")) for i in range(18)]
    assert not any(passed)
    assert limiter.pending() == {("slipstream.x", logging.WARNING, "disk full writing %s"): 18}
    clock.now += 10.5
    later = _record("disk full writing %s", "b.db")
    assert limiter.filter(later)
    assert later.getMessage() == "disk full writing b.db (repeated 18 times in the last 10.5 s)"
    assert later.repeated == 18  # type: ignore[attr-defined]
    assert limiter.pending() == {}


def test_different_messages_levels_and_loggers_are_limited_apart_and_info_is_never_limited() -> None:
    limiter = RateLimitFilter(10.0, clock=_Clock())
    assert limiter.filter(_record("disk full"))
    assert limiter.filter(_record("queue full"))
    assert limiter.filter(_record("disk full", level=logging.ERROR))
    assert limiter.filter(_record("disk full", name="slipstream.y"))
    assert not limiter.filter(_record("disk full"))
    assert all(limiter.filter(_record("loaded %s", v, level=logging.INFO)) for v in "123")


def test_the_limiter_forgets_the_oldest_message_past_max_keys() -> None:
    limiter = RateLimitFilter(10.0, max_keys=2, clock=_Clock())
    for msg in ("a", "b", "c"):
        assert limiter.filter(_record(msg))
    assert limiter.filter(_record("a"))  # forgotten, so it passes again
    assert not limiter.filter(_record("c"))


def test_the_server_log_holds_back_a_repeated_warning_and_reports_the_count() -> None:
    # In a fresh interpreter: configure_logging replaces the 'slipstream' logger's handlers.
    script = (
        "import logging, time\n"
        "from slipstream.serve.server import configure_logging\n"
        "configure_logging(repeat_interval_s=0.3)\n"
        "log = logging.getLogger('slipstream.serve.monitor')\n"
        "for i in range(19): log.warning('disk full writing %s', i)\n"
        "time.sleep(0.4)\n"
        "log.warning('disk full writing %s', 'last')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    assert lines[0]["message"] == "disk full writing 0"
    assert re.fullmatch(r"disk full writing last \(repeated 18 times in the last \d+\.\d s\)", lines[1]["message"])
    assert lines[1]["repeated"] == 18


def test_the_limiter_refuses_a_nonsense_interval() -> None:
    with pytest.raises(ConfigError, match="interval_s > 0"):
        RateLimitFilter(0.0)
