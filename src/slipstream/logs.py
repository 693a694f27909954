"""Rate-limited logging: the same message at most once per interval, then how many times it repeated.

A fault that persists (a full disk, a flood of malformed requests) would otherwise log on every event:
a full disk logged about 19 warnings a second. The filter keys a record on its logger, level and *format
string* (``record.msg`` before ``%`` formatting), so "write failed for %s" with changing arguments counts as
one message. The first occurrence passes; later ones within ``interval_s`` are dropped and counted; the
first one after the interval passes with " (repeated K times in the last N s)" appended.

Use it on a handler (every record the handler writes, from any child logger) or on one logger::

    from slipstream.logs import RateLimitFilter

    handler.addFilter(RateLimitFilter(interval_s=10.0))                      # what configure_logging does
    logging.getLogger("slipstream.serve.monitor").addFilter(RateLimitFilter())  # one logger only

Records below ``min_level`` (INFO and DEBUG by default) always pass: those are events, not floods, and
two different events often share a format string. Drops that are never followed by another occurrence are
not reported (there is no timer); call :meth:`RateLimitFilter.pending` to read them, e.g. at shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from slipstream.errors import ConfigError

__all__ = ["RateLimitFilter"]

_Key = tuple[str, int, str]


class RateLimitFilter(logging.Filter):
    """Pass a repeated message at most once per ``interval_s``; the next one that passes carries the count.

    ``max_keys`` bounds the memory when format strings are built at run time (f-strings): past it the
    oldest key is forgotten. Thread-safe: the monitor threads and the event loop log through one handler.
    """

    def __init__(
        self,
        interval_s: float = 10.0,
        *,
        min_level: int = logging.WARNING,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if interval_s <= 0 or max_keys < 1:
            raise ConfigError(
                f"RateLimitFilter needs interval_s > 0 and max_keys >= 1; got {interval_s} and {max_keys}.",
                hint="Pass a positive interval and key count.",
            )
        self.interval_s = interval_s
        self.min_level = min_level
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [time the last passing record went out, records dropped since]
        self._seen: dict[_Key, list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            state = self._seen.get(key)
            if state is not None and now - state[0] < self.interval_s:
                state[1] += 1
                return False
            dropped = int(state[1]) if state is not None else 0
            since = now - state[0] if state is not None else 0.0
            self._seen.pop(key, None)  # re-insert: the dict's order is the least recently passed first
            self._seen[key] = [now, 0]
            while len(self._seen) > self.max_keys:
                del self._seen[next(iter(self._seen))]
        if dropped:
            # Freeze the formatted text: the appended count must not go through %-formatting with the args.
            record.msg = f"{record.getMessage()} (repeated {dropped} times in the last {since:.1f} s)"
            record.args = None
            record.repeated = dropped
        return True

    def pending(self) -> dict[tuple[str, int, str], int]:
        """Messages dropped since they last passed, by (logger, level, format string): not yet reported."""
        with self._lock:
            return {key: int(state[1]) for key, state in self._seen.items() if state[1]}
