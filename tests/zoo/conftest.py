"""Session-scoped zoo: each entry is built and converted once, on first use, and one real server serves every
bundle that converted. A failed conversion is kept and raised again in each test of that entry."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from slipstream.serve.background import ServerThread
from slipstream.serve.settings import ServeSettings
from tests.zoo.harness import Converted, convert_entry
from tests.zoo.models import BY_NAME, ZOO


class Zoo:
    """Converted entries by name, each converted the first time a test asks for it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._done: dict[str, Converted | BaseException] = {}

    def get(self, name: str) -> Converted:
        if name not in self._done:
            try:
                self._done[name] = convert_entry(BY_NAME[name], self.work)
            except Exception as exc:  # kept and re-raised in every test of this entry, not only the first
                self._done[name] = exc
        found = self._done[name]
        if isinstance(found, BaseException):
            raise found
        return found

    def converted(self, names: Iterable[str]) -> list[Converted]:
        """Those of ``names`` that convert (the others' tests fail, or are expected to, on their own)."""
        out = []
        for name in names:
            try:
                out.append(self.get(name))
            except Exception:  # that entry's own tests report it
                continue
        return out


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # the transformers entries come from configs: nothing may download
        yield Zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def zoo_client(zoo: Zoo, request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """One server on loopback (port 0) serving a repository of every zoo bundle this session's tests use
    (all of them in a full run; only the selected ones under -k) that converted."""
    specs = [getattr(item, "callspec", None) for item in request.session.items]
    names = {c.params["name"] for c in specs if c is not None and "name" in c.params}
    zoo.converted(e.name for e in ZOO if e.name in names)
    settings = ServeSettings(port=0, access_log=False)
    with ServerThread(zoo.work / "bundles", settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
