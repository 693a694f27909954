"""The hostile clients of benchmarks/hostile.py, and its in-process measure of the protocol's own cost.

Not a benchmark on its own: hostile.py imports it. Every client connects to 127.0.0.1 and stops when told.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

INFER = "/v2/models/tiny/infer"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """The server's peak RSS over a window, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Attack:
    """Runs ``make(port, stop, stats)`` coroutines in an event loop of their own thread until stopped."""

    def __init__(self, tasks: list[Callable[[threading.Event], Coroutine[Any, Any, None]]]) -> None:
        self.stop = threading.Event()
        self._tasks = tasks
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        await asyncio.gather(*(t(self.stop) for t in self._tasks), return_exceptions=True)

    def __enter__(self) -> Attack:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=30)


async def _status(reader: asyncio.StreamReader, timeout: float) -> str:
    try:
        first = await asyncio.wait_for(reader.read(64), timeout)
    except (TimeoutError, OSError):
        return "none"
    return first.split(b" ")[1].decode() if first.startswith(b"HTTP/1.1 ") else ("closed" if not first else "?")


def bomb(port: int, stats: Counter[str]) -> Callable[[threading.Event], Coroutine[Any, Any, None]]:
    """One connection at a time sending ``X-Bomb: aaaa...`` (64 MB, no end of line), then again."""

    async def run(stop: threading.Event) -> None:
        chunk = b"a" * (64 << 10)
        while not stop.is_set():
            sent = 0
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect errors"] += 1
                await asyncio.sleep(0.05)
                continue
            try:
                writer.write(f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bomb: ".encode())
                while sent < 64 << 20 and not stop.is_set():
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            except OSError:
                pass
            stats["attempts"] += 1
            stats["KB written"] += sent >> 10
            stats[f"answer {await _status(reader, 0.5)}"] += 1
            writer.close()
            await asyncio.sleep(0.5)

    return run


def slow(port: int, kind: str, lives: list[float], stats: Counter[str]) -> Callable[[threading.Event], Any]:
    """A connection that trickles its head (slowloris) or its body every 0.5 s; reconnects once closed."""
    body = (
        b'{"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [' + b"0.5, " * 63 + b"0.5]}]}"
    )

    async def run(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats[f"{kind} connect errors"] += 1
                await asyncio.sleep(0.5)
                continue
            start, i = time.monotonic(), 0
            if kind == "slowloris":
                writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            else:
                writer.write(
                    f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                )
            closed = False
            while not stop.is_set() and not closed:
                try:
                    first = await asyncio.wait_for(reader.read(64), 0.5)
                    closed = True
                    stats[f"{kind} answer {first.split(b' ')[1].decode() if first else 'closed'}"] += 1
                except TimeoutError:
                    try:
                        writer.write(b"X-Slow: 1\r\n" if kind == "slowloris" else body[i : i + 1])
                        i += 1
                    except OSError:
                        closed = True
                except OSError:
                    closed = True
                    stats[f"{kind} reset"] += 1
            if closed:
                lives.append(time.monotonic() - start)
            writer.close()

    return run


class _Transport(asyncio.Transport):
    """Takes the protocol's writes and drops them: the in-process cost measure has no socket."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def protocol_cpu_us(body_doc: dict[str, object], rounds: int, per_round: int) -> dict[str, list[float]]:
    """CPU µs per request through each protocol (parse, ASGI task, response), no socket: interleaved rounds."""
    import json

    import uvicorn
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from slipstream.serve.http_limits import protocol_class
    from slipstream.serve.settings import HttpSettings

    body = json.dumps(body_doc).encode()
    request = (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    classes: dict[str, type[HttpToolsProtocol]] = {
        "limited": protocol_class(HttpSettings())[0],
        "plain httptools": HttpToolsProtocol,
    }

    async def one_round(cls: type[HttpToolsProtocol]) -> float:
        config = uvicorn.Config(_answer, http=cls, lifespan="off", access_log=False, log_config=None)
        proto = cls(config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
        proto.connection_made(_Transport())
        start = time.process_time()
        for _ in range(per_round):
            proto.data_received(request)
            while not proto.cycle.response_complete:
                await asyncio.sleep(0)
        spent = time.process_time() - start
        proto.connection_lost(None)
        return spent * 1e6 / per_round

    async def main() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name in classes}
        for r in range(rounds):
            for name in list(classes)[r % 2 :] + list(classes)[: r % 2]:
                out[name].append(await one_round(classes[name]))
        return out

    return uvloop.run(main())
