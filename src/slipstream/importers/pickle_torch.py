"""The pickles inside PyTorch files, checked before torch unpickles them.

- A pickled whole model (``torch.save(model)``) loads, with ``trust_pickle``, through an unpickler whose
  ``find_class`` admits torch's own weights-only globals, ``nn.Module`` subclasses and
  ``torch.nn.functional`` functions, and nothing else (no ``os.system``, no ``builtins.eval``).
- A ``torch.export`` ``.pt2`` archive looks safe but is not: ``torch.export.load`` unpickles weights,
  constants and sample inputs stored as pickles with ``weights_only=False``, and opaque constants with
  plain ``pickle.loads``. Every pickle in the archive (nested ``torch.save`` archives included) is
  scanned statically first (:func:`slipstream.importers.pickle_scan.pickle_globals`), and the archive is
  then loaded from the very bytes that were scanned.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

from slipstream.errors import UntrustedPickleError
from slipstream.importers.pickle_scan import _NAMED, COMPUTED, pickle_globals

_PICKLE_HEADERS = tuple(bytes([0x80, proto]) for proto in range(2, 6))


@functools.cache
def _weights_only_names() -> frozenset[str]:
    """torch's own allow-list for ``weights_only=True`` loads, plus names registered with add_safe_globals."""
    import torch.serialization
    from torch._weights_only_unpickler import _get_allowed_globals

    extra = {
        f"{getattr(g, '__module__', '')}.{getattr(g, '__name__', '')}" for g in torch.serialization.get_safe_globals()
    }
    return frozenset(_get_allowed_globals()) | frozenset(extra)


def torch_refusal_reason(module: str, name: str, *, trust: bool) -> str | None:
    """None when a torch pickle may import ``module.name``; otherwise why not (it is never imported then)."""
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    qualified = f"{module}.{name}"
    if module == COMPUTED:
        return "the pickle computes the name of what it imports, which a scan cannot check"
    if (module, name) in _NAMED or qualified in _weights_only_names():
        return None
    if not trust:
        return f"{qualified} is outside torch's weights-only allow-list"
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        return f"{qualified} is outside the allow-list"
    if "." in name or not name.isidentifier():
        return f"{qualified} is a nested name, which the allow-list does not resolve"
    import torch

    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return f"{qualified} cannot be found"
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return None  # a module class: its constructor is not called by unpickling, only __setstate__
    if module == "torch.nn.functional" and callable(obj) and not name.startswith("_"):
        return None  # e.g. self.act = F.relu
    return f"{qualified} is a {type(obj).__name__}, not an nn.Module class or a torch.nn.functional function"


class _RefusedError(Exception):
    def __init__(self, qualified: str, reason: str) -> None:
        super().__init__(reason)
        self.qualified = qualified
        self.reason = reason


class _TrustedModelUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        reason = torch_refusal_reason(module, name, trust=True)
        if reason is not None:
            raise _RefusedError(f"{module}.{name}", reason)
        return super().find_class(module, name)


def _restricted_pickle_module() -> types.ModuleType:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and a ``load`` function."""
    module = types.ModuleType("slipstream_restricted_pickle")
    module.Unpickler = _TrustedModelUnpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: _TrustedModelUnpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


def load_torch_pickle(path: Path) -> Any:
    """``torch.load(path, weights_only=False)`` behind the allow-list (the caller passed --trust-pickle)."""
    import torch

    data = path.read_bytes()
    try:
        return torch.load(
            io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module()
        )
    except _RefusedError as refused:
        raise refusal_error(path, refused.qualified, refused.reason, trust=True) from None


def scan_torch_archive(data: bytes, path: Path, *, trust: bool) -> None:
    """Refuse an archive any of whose pickles imports a global off the allow-list; nothing is unpickled."""
    for member, module, name in _archive_globals(data, str(path)):
        reason = torch_refusal_reason(module, name, trust=trust)
        if reason is not None:
            raise refusal_error(path, f"{module}.{name}" if name else module, f"in {member}: {reason}", trust=trust)


def _archive_globals(data: bytes, where: str, depth: int = 0) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    if depth > 3:  # nested torch.save archives go one level deep; deeper nesting has no reason to exist
        return [(where, COMPUTED, "")]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            with archive.open(info) as handle:
                head = handle.read(4)  # decide from the first bytes: raw weights are never read whole here
            label = f"{where}!{info.filename}"
            if head == b"PK\x03\x04":
                found += _archive_globals(archive.read(info), label, depth + 1)
                continue
            must_parse = info.filename.endswith(".pkl") or "/constants/opaque_obj_" in f"/{info.filename}"
            if not (must_parse or head.startswith(_PICKLE_HEADERS)):
                continue  # raw tensor bytes, JSON, text
            found += [(label, m, n) for m, n in _stream_globals(archive.read(info), must_parse=must_parse)]
    return found


def _stream_globals(member: bytes, *, must_parse: bool) -> list[tuple[str, str]]:
    """Globals of every pickle laid end to end in ``member`` (torch's legacy format writes several)."""
    found: list[tuple[str, str]] = []
    offset = 0
    while offset < len(member) and (offset == 0 or member.startswith(_PICKLE_HEADERS, offset)):
        try:
            names, offset = pickle_globals(member, offset)
        except ValueError:
            if must_parse and offset == 0:
                return [(COMPUTED, "")]  # an unreadable pickle that torch would still try to load
            break  # raw storage bytes after the pickles
        found += names
    return found


def refusal_error(path: Path, qualified: str, reason: str, *, trust: bool) -> UntrustedPickleError:
    allowed = (
        "torch's weights-only globals, nn.Module classes and torch.nn.functional functions"
        if trust
        else "torch's weights-only globals (tensors, parameters, containers)"
    )
    return UntrustedPickleError(
        f"'{path}' contains a pickle that imports {qualified} ({reason}); the file was refused at that import, "
        f"so nothing off the allow-list was imported or run. PyTorch files load with {allowed}.",
        source=str(path),
        hint="If the file came from somewhere you do not control, do not use it. If it is yours, save the model "
        "again with torch.export.save() from this PyTorch, or give an entry point FILE.py:FACTORY that builds the "
        "module and loads a state dict.",
    )
