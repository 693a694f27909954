"""The forms a PyTorch model arrives in, loaded into memory.

- an entry point ``path/to/file.py:factory`` or ``package.module:factory`` returning an ``nn.Module``,
  with example inputs from a companion function (``<factory>_example_inputs`` or ``example_inputs``);
- a TorchScript ``.pt`` file;
- a ``torch.export`` ``.pt2`` file (it carries its own example inputs and dynamic shapes);
- a pickled whole model (``torch.save(model)``), which runs code when loaded: only with ``trust_pickle``;
- an in-memory module, passed straight through;
- a :class:`TorchSource` already loaded elsewhere (a transformers model directory, see
  :mod:`slipstream.importers.transformers_dir`), also passed through.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import JsonValue

from slipstream.artifact.hashing import sha256_file
from slipstream.errors import ConversionError, InvalidModelError, UntrustedPickleError
from slipstream.importers.pickle_torch import load_torch_pickle, scan_torch_archive

SourceKind = Literal["module", "entry_point", "torchscript", "exported_program", "pickle", "transformers_dir"]


@dataclass(frozen=True)
class TorchSource:
    """A loaded PyTorch model, where it came from, and the example inputs it brought along (if any)."""

    model: Any  # nn.Module, torch.jit.ScriptModule or torch.export.ExportedProgram
    kind: SourceKind
    name: str
    path: str | None = None
    sha256: str | None = None
    example_inputs: Any = None  # tensor, tuple/list of tensors, or dict name -> tensor
    details: dict[str, JsonValue] = field(default_factory=dict)  # recorded in the manifest's resolved choices


def is_entry_point(text: str) -> bool:
    """``file.py:factory`` or ``pkg.module:factory`` (and not a Windows drive letter)."""
    left, sep, right = text.rpartition(":")
    return bool(sep) and right.isidentifier() and len(left) > 1


def load_torch_source(source: object, *, trust_pickle: bool) -> TorchSource:
    """Load ``source`` (a module object, an entry point string or a model file) into memory."""
    import torch

    if isinstance(source, TorchSource):
        return source
    if isinstance(source, torch.nn.Module | torch.export.ExportedProgram):
        kind: SourceKind = "exported_program" if isinstance(source, torch.export.ExportedProgram) else "module"
        if isinstance(source, torch.jit.ScriptModule):
            kind = "torchscript"
        return TorchSource(model=source, kind=kind, name=type(source).__name__.lower())
    text = str(source)
    path = Path(text)
    if not path.exists() and is_entry_point(text):
        return _load_entry_point(text)
    if not path.is_file():
        raise InvalidModelError(
            f"Expected a PyTorch model file or an entry point like 'model.py:build'; '{text}' is neither.",
            source=text,
            hint="Check the path, or give FILE.py:FACTORY / package.module:FACTORY.",
        )
    return _load_file(path, trust_pickle=trust_pickle)


def load_torch_module(source: object, *, trust_pickle: bool = False) -> Any:
    """The runnable torch module behind ``source`` (a torch.export program gives its ``.module()``)."""
    import torch

    model = load_torch_source(source, trust_pickle=trust_pickle).model
    return model.module() if isinstance(model, torch.export.ExportedProgram) else model


def _load_file(path: Path, *, trust_pickle: bool) -> TorchSource:
    import torch

    digest = sha256_file(path)
    common: dict[str, Any] = {"name": path.stem, "path": str(path), "sha256": digest}
    if path.suffix.lower() == ".pt2":
        # torch.export.load unpickles parts of the archive with weights_only=False: scan them all first, then
        # load the very bytes that were scanned.
        data = path.read_bytes()
        scan_torch_archive(data, path, trust=trust_pickle)
        try:
            program = torch.export.load(io.BytesIO(data))
        except Exception as exc:  # torch raises many unrelated types for a bad archive
            raise _unreadable(path, "a torch.export .pt2 archive", exc) from exc
        args, kwargs = program.example_inputs or ((), {})
        return TorchSource(model=program, kind="exported_program", example_inputs=kwargs or tuple(args), **common)
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the files still load fine
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            return TorchSource(model=scripted, kind="torchscript", **common)
        except Exception as exc:
            raise _unreadable(path, "a TorchScript archive", exc) from exc
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"'{path}' is a pickled whole model (torch.save(model)). Loading it runs arbitrary Python code "
                "stored in the file, so slipstream does not load it unless told to trust it.",
                source=str(path),
                hint="If you trust where this file came from, pass --trust-pickle (trust_pickle=True). Safer: "
                "save a state dict and give an entry point FILE.py:FACTORY that builds the model and loads it, "
                "or save it with torch.jit.script(...).save() or torch.export.save().",
            ) from exc
        loaded = load_torch_pickle(path)  # trusted, yet behind an allow-list of what it may import
        if not isinstance(loaded, torch.nn.Module):
            raise InvalidModelError(
                f"'{path}' unpickles to a {type(loaded).__name__}, not a torch.nn.Module.",
                source=str(path),
                hint="Save the whole model with torch.save(model), or give an entry point FILE.py:FACTORY.",
            ) from None
        return TorchSource(model=loaded, kind="pickle", **common)
    except Exception as exc:
        raise _unreadable(path, "a PyTorch file", exc) from exc
    raise InvalidModelError(
        f"'{path}' holds a {type(loaded).__name__} (weights only, e.g. a state dict), not a model: "
        "the architecture is not in the file.",
        source=str(path),
        hint="Give an entry point FILE.py:FACTORY whose factory builds the module and loads this state dict.",
    )


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _unreadable(path: Path, what: str, exc: Exception) -> InvalidModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return InvalidModelError(
        f"'{path}' could not be read as {what} ({type(exc).__name__}: {first}).",
        source=str(path),
        hint="Re-save the model with the torch version installed here, or check that the file is complete.",
    )


def _load_entry_point(text: str) -> TorchSource:
    import torch

    target, _, factory_name = text.rpartition(":")
    module, path = _import_target(target, text)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConversionError(
            f"Entry point '{text}' names '{factory_name}', which is not a function in '{target}'; "
            f"its functions are: {', '.join(found) or 'none'}.",
            source=text,
            hint="Give FILE.py:FACTORY where FACTORY() returns a torch.nn.Module.",
        )
    model = _call_user(factory, text, "the factory")
    if not isinstance(model, torch.nn.Module):
        raise ConversionError(
            f"Entry point '{text}' returned a {type(model).__name__}; expected a torch.nn.Module.",
            source=text,
            hint="Make the factory return the model (for example `return Net().eval()`).",
        )
    companion = getattr(module, f"{factory_name}_example_inputs", None) or getattr(module, "example_inputs", None)
    examples = _call_user(companion, text, "the example-inputs function") if callable(companion) else companion
    return TorchSource(
        model=model,
        kind="entry_point",
        # file-factory: two factories in one file must not both be named after the file
        name=f"{Path(target).stem if target.endswith('.py') else target.rpartition('.')[2]}-{factory_name}",
        path=str(path) if path else text,
        sha256=sha256_file(path) if path else None,
        example_inputs=examples,
    )


def _import_target(target: str, text: str) -> tuple[ModuleType, Path | None]:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InvalidModelError(f"Entry point '{text}': there is no file '{path}'.", source=text)
        spec = importlib.util.spec_from_file_location(f"_slipstream_entry_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise InvalidModelError(f"Entry point '{text}': '{path}' cannot be imported.", source=text)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and typing look a class's module up by name
        # The file may import its siblings, as it would when run as a script.
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            _call_user(lambda: spec.loader.exec_module(module), text, f"importing '{path}'")  # type: ignore[union-attr]
        finally:
            sys.path.remove(str(path.parent.resolve()))
        return module, path
    try:
        module = importlib.import_module(target)
    except ImportError as exc:
        raise InvalidModelError(
            f"Entry point '{text}': module '{target}' cannot be imported ({exc}).",
            source=text,
            hint="Install the package or give a file path like path/to/model.py:build.",
        ) from exc
    file = getattr(module, "__file__", None)
    return module, Path(file) if file else None


def _call_user(fn: Callable[[], Any], text: str, what: str) -> Any:
    try:
        return fn()
    except Exception as exc:  # user code can raise anything; say where it came from
        raise ConversionError(
            f"Entry point '{text}': {what} raised {type(exc).__name__}: {exc}",
            source=text,
            hint="Fix the error in your model code; run the factory by hand to see the full traceback.",
        ) from exc
