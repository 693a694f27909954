"""The HTTP route table: (method, path pattern) -> handler, built once per app.

A path is matched once; the match names the model and version the request is for (``{name}``,
``{version}``), so nothing downstream parses the URL again. Each route says who may call it
(``access``), and a path that exists under another method answers 405.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from slipstream.errors import MethodNotAllowedError

Access = Literal["open", "metrics", "caller", "admin"]  # metrics: a caller's key unless metrics_open


class Call:
    """One HTTP request on its way through a handler: what came, and what the route resolved."""

    __slots__ = ("caller", "client", "entry", "headers", "method", "model", "receive", "request_id", "scope",
                 "started", "version")  # fmt: skip

    def __init__(self, scope: Any, receive: Any, request_id: str, started: float) -> None:
        self.scope = scope
        self.receive = receive
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.method: str = scope["method"]
        self.request_id = request_id
        self.started = started
        self.client: str = (scope.get("client") or ("local", 0))[0]
        self.model: str | None = None  # from the route's {name}
        self.version: str | None = None  # from the route's {version}
        self.caller = ""  # the authenticated caller (a key digest, or the client address without keys)
        self.entry: Any = None  # the ModelVersion an infer request resolved, once it did


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: the method it answers, who may call it, and its handler."""

    method: str
    access: Access
    handler: Handler


@dataclass(frozen=True, slots=True)
class Match:
    """A path's endpoints by method, who may call them, and the model and version its pattern captured."""

    routes: dict[str, Route]
    access: Access
    model: str | None = None
    version: str | None = None

    def route(self, method: str) -> Route:
        found = self.routes.get(method)
        if found is None:
            allowed = " or ".join(sorted(self.routes))
            raise MethodNotAllowedError(f"This endpoint answers {allowed}, not {method}.", hint=f"Use {allowed}.")
        return found


_PARAMS = ("{name}", "{version}")
_CACHE_PATHS = 4096  # matched paths remembered (model paths are few; a flood of distinct ones just resets it)


class RouteTable:
    """Patterns like ``/v2/models/{name}/versions/{version}/infer``; ``{name}`` and ``{version}`` take one
    path segment each. Static paths are one dict lookup; patterns are tried by segment count, in order."""

    def __init__(self, routes: Iterable[tuple[str, str, Access, Handler]]) -> None:
        self._static: dict[str, dict[str, Route]] = {}
        self._cache: dict[str, Match] = {}
        self._patterns: dict[int, list[tuple[tuple[str, ...], dict[str, Route]]]] = {}
        for method, pattern, access, handler in routes:
            segments = tuple(pattern.strip("/").split("/"))
            if not any(s in _PARAMS for s in segments):
                by_method = self._static.setdefault(pattern.rstrip("/") or "/", {})
            else:
                group = self._patterns.setdefault(len(segments), [])
                known = [m for s, m in group if s == segments]
                by_method = known[0] if known else {}
                if not known:
                    group.append((segments, by_method))
            if method in by_method or any(r.access != access for r in by_method.values()):
                raise ValueError(f"route {method} {pattern} is declared twice, or for another audience")  # a bug
            by_method[method] = Route(method, access, handler)

    def match(self, path: str) -> Match | None:
        found = self._cache.get(path)
        if found is None:
            found = self._match(path)
            if found is not None:
                if len(self._cache) >= _CACHE_PATHS:
                    self._cache.clear()
                self._cache[path] = found
        return found

    def _match(self, path: str) -> Match | None:
        static = self._static.get(path.rstrip("/") or "/")
        if static is not None:
            return Match(static, _access(static))
        parts = path.strip("/").split("/")
        for segments, by_method in self._patterns.get(len(parts), ()):
            model = version = None
            for want, got in zip(segments, parts, strict=True):
                if want == "{name}":
                    model = got
                elif want == "{version}":
                    version = got
                elif want != got:
                    break
            else:
                return Match(by_method, _access(by_method), model, version)
        return None


def _access(routes: dict[str, Route]) -> Access:
    return next(iter(routes.values())).access
