"""A fork server for the build's candidate children: the imports are paid once, each child is still fresh.

Every candidate is built and measured in a child process of its own (build/isolate.py), so a crash in
onnxruntime is a recorded failure. Starting ``python -m slipstream.build.isolate`` costs about a second of
imports per candidate (numpy, onnx, onnxruntime, the passes); a build of ten candidates paid that ten times.

The server is a clean interpreter (``python -m slipstream.build.forkserver``, never the caller's ``__main__``,
so a script without a main guard is not run again) that imports :data:`PRELOAD` once and then, for each
request on its stdin, forks a child that runs :func:`slipstream.build.isolate.child_main` with the caller's
environment and working directory, and answers on its stdout with the child's pid, then its exit status.
The server is single-threaded and forks before any session exists; each child is a fresh copy of it.

The caller kills a child that runs past its time itself (it has the pid). When the server cannot start or
dies, :func:`run_forked` returns None and the caller starts a plain interpreter instead, so a build never
depends on it. ``SLIPSTREAM_FORKSERVER=0`` turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

# What the server imports once, so that no child pays for it (a pass imports its own extras, e.g. torch).
PRELOAD = (
    "numpy",
    "onnx",
    "onnxruntime",
    "slipstream.build.isolate",
    "slipstream.build.measure",
    "slipstream.passes.recipe",
    "slipstream.evaluate.bench",
    "slipstream.evaluate.quality",
    "slipstream.runtime.open",
)
ENV_SWITCH = "SLIPSTREAM_FORKSERVER"


class _Server:
    """The caller's handle on one server process; requests are serialized (builds measure one at a time)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slipstream.build.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lock = threading.Lock()
        self._buffer = b""
        ready = self._read_line(time.monotonic() + 120.0)
        if ready is None or json.loads(ready).get("ready") is not True:
            self.close()
            raise OSError("the build's fork server did not start")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read_line(self, deadline: float | None) -> bytes | None:
        """One line from the server, or None at EOF or when ``deadline`` (monotonic) passes first."""
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([fd], [], [], wait)
            if not readable:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def run(self, args: tuple[str, str, str], timeout_s: float) -> tuple[bool, int | None]:
        """(served, exit code): served is False when the server failed (the caller runs the child itself);
        the code is negative for a signal, None when the child ran past ``timeout_s`` and was killed."""
        request = {"args": list(args), "env": dict(os.environ), "cwd": str(Path.cwd())}
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(request).encode() + b"\n")
            stdin.flush()
        except OSError:
            return False, None
        started = self._read_line(time.monotonic() + 60.0)
        if started is None:
            return False, None
        pid = int(json.loads(started)["pid"])
        ended = self._read_line(time.monotonic() + timeout_s)
        timed_out = ended is None and self.alive()
        if timed_out:
            _kill(pid)
            ended = self._read_line(time.monotonic() + 60.0)
        if ended is None:
            return False, None  # the server went away with the child: the caller records it as a crash
        code = int(json.loads(ended)["status"])
        return True, None if timed_out else code

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # a zombie until the server reaps it: never another's pid
        os.kill(pid, signal.SIGKILL)


_server: _Server | None = None
_server_lock = threading.Lock()


def _get_server() -> _Server | None:
    global _server
    with _server_lock:
        if _server is not None and not _server.alive():
            _server.close()
            _server = None
        if _server is None:
            try:
                _server = _Server()
            except OSError:
                return None
            atexit.register(_server.close)
        return _server


def enabled() -> bool:
    return hasattr(os, "fork") and os.environ.get(ENV_SWITCH, "1") != "0"


def run_forked(args: tuple[str, str, str], timeout_s: float) -> tuple[bool, int | None]:
    """Run ``child_main(task_file, status_file)`` with stderr to ``stderr_file`` (``args``) in a child of
    the fork server: (served, exit code) as :meth:`_Server.run` says; (False, None) when it is off or down."""
    if not enabled():
        return False, None
    server = _get_server()
    if server is None:
        return False, None
    with server.lock:
        return server.run(args, timeout_s)


# ---- the server --------------------------------------------------------------------------------------------


def _child(request: dict[str, Any]) -> None:
    """In the forked child: the caller's environment and directory, stdout dropped, stderr to its file."""
    from slipstream.build.isolate import child_main

    task_file, status_file, stderr_file = request["args"]
    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(stderr_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err, 2)
        code = child_main(task_file, status_file)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)  # never return into the server's loop; the outcome is in the status file


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Answer requests until stdin closes: fork, report the pid, wait, report the exit status."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in inp:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        out.write(json.dumps({"pid": pid}).encode() + b"\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"status": code}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
