"""`slipstream serve` in its own process: SIGTERM answers new connections 503, drains the one in flight, exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from tests.serve_support import Reference, add_version, free_port


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def _late_request(port: int) -> bytes | None:
    """What a connection opened now gets for a request (None when it is refused or reset)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := conn.recv(65536):
                raw += chunk
            return raw
    except OSError:
        return None


def test_sigterm_answers_new_connections_503_drains_the_request_in_flight_and_exits_0(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "mlp", "1", tmp_path)
    port = free_port()
    cmd = [sys.executable, "-c", "from slipstream.cli import main; main()", "serve", str(repo), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        x = np.arange(16, dtype=np.float32).reshape(2, 8) / 16
        body = json.dumps(
            {
                "id": "inflight",
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 8], "data": x.reshape(-1).tolist()}],
            }
        ).encode()
        head = (
            f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        conn = socket.create_connection(("127.0.0.1", port), timeout=20)
        conn.sendall(head + body[:20])  # the request is in flight: headers read, body still coming
        deadline = time.monotonic() + 10
        while "slipstream_in_flight_requests 1.0" not in httpx.get(f"http://127.0.0.1:{port}/metrics").text:
            assert time.monotonic() < deadline, "the server never saw the request in flight"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        # While the request in flight drains, a new connection is read and answered 503, not reset or refused.
        deadline = time.monotonic() + 10
        while (late := _late_request(port)) is None or b"shutting down" not in late:
            assert time.monotonic() < deadline, f"no 503 for a connection opened during the drain: {late!r}"
            time.sleep(0.05)
        assert late.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nretry-after: 1\r\n" in late
        conn.sendall(body[20:])
        raw = b""
        while chunk := conn.recv(65536):  # while draining, the server closes the connection after answering
            raw += chunk
        conn.close()
        status_line, rest = raw.split(b"\r\n", 1)
        assert status_line == b"HTTP/1.1 200 OK"
        doc = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        want = Reference().run("mlp", "1", {"pixels": x})["probabilities"]
        assert doc["id"] == "inflight"
        np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(2, 4), want, rtol=1e-6)
        assert proc.wait(timeout=30) == 0  # a drained stop is a clean exit, not death by signal
        assert _refuses_connections(port)
        log = proc.stderr.read().decode() if proc.stderr else ""
        assert "draining in-flight requests" in log
        assert any(json.loads(line).get("request_id") for line in log.splitlines() if line.startswith("{"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
