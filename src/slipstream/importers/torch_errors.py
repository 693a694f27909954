"""Turning PyTorch export failures into errors people can act on.

The exporters bury the cause in a chain of exceptions and a page of advice for PyTorch developers.
An op without an ONNX conversion becomes :class:`UnsupportedOpError` naming the op and the submodule
that calls it (found by running the model once with a dispatch recorder), with a suggestion.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from slipstream.errors import ConversionError, UnsupportedOpError

# dynamo: "No ONNX function found for <OpOverload(op='aten.cummax', overload='default')>"
_DYNAMO_OP = re.compile(r"OpOverload\(op='([\w.]+)', overload='\w+'\)")
# TorchScript: "Exporting the operator 'aten::cummax' to ONNX opset version 17 is not supported."
_TORCHSCRIPT_OP = re.compile(r"operator '([\w.:]+)'")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


@contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the exporters' own warnings and log lines (missing torchvision ops, deprecations).

    They describe the exporter's internals, not the user's model; anything that matters to the
    user surfaces as an exception, which is translated, or as a parity failure.
    """
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def failed_op(exc: BaseException) -> str | None:
    """The op the exporter could not convert, as ``aten::name``, if the failure was that."""
    for err in _chain(exc):
        text = str(err)
        if "No ONNX function found" in text or "No decompositions registered" in text:
            match = _DYNAMO_OP.search(text)
            if match:
                namespace, _, rest = match.group(1).partition(".")
                return f"{namespace}::{rest}"
        if type(err).__name__ == "UnsupportedOperatorError" or "is not supported" in text:
            match = _TORCHSCRIPT_OP.search(text)
            if match:
                return match.group(1).replace(".", "::", 1) if "::" not in match.group(1) else match.group(1)
    return None


def op_origin(module: Any, args: tuple[Any, ...], op: str) -> str | None:
    """The submodule (path and class) whose forward() first calls ``op`` when run on ``args``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        return None
    paths = {id(m): path for path, m in module.named_modules()}
    stack: list[torch.nn.Module] = []
    found: list[torch.nn.Module] = []

    class Recorder(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's base class is untyped
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not found and stack and func._schema.name == op:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    # Hooks must return None: a value returned by a forward hook replaces the module's output.
    def enter(mod: torch.nn.Module, _inputs: Any) -> None:
        stack.append(mod)

    def leave(_mod: torch.nn.Module, _inputs: Any, _output: Any) -> None:
        stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        with torch.no_grad(), Recorder():  # type: ignore[no-untyped-call]
            module(*args)
    except Exception:  # best effort: the export error is raised either way, with or without the module
        return None
    finally:
        pre.remove()
        post.remove()
    if not found:
        return None
    sub = found[0]
    path = paths.get(id(sub), "")
    return f"'{path or '(root)'}' ({type(sub).__name__})"


def export_failure(
    exc: BaseException, exporter: str, module: Any, args: tuple[Any, ...], opset: int | None, source: str | None
) -> ConversionError:
    """The error to raise for an exporter exception."""
    op = failed_op(exc)
    other = "torchscript" if exporter == "dynamo" else "dynamo"
    if op is not None:
        where = op_origin(module, args, op)
        used = f"opset {opset}" if opset else "the exporter's default opset"
        return UnsupportedOpError(
            f"The {exporter} exporter has no ONNX conversion for the op {op}"
            + (f", called in module {where}" if where else "")
            + f" ({used}).",
            op=op,
            module=where,
            source=source,
            hint=f"Try a newer opset (--opset 18..21), or the other exporter (--exporter {other}); otherwise "
            "rewrite that module with ops ONNX supports, or register a custom symbolic for the op.",
        )
    root = _chain(exc)[-1]
    text = _ANSI.sub("", str(root)).strip()
    first = text.splitlines()[0] if text else type(root).__name__
    stage = f"The {exporter} exporter failed"
    return ConversionError(
        f"{stage}: {type(root).__name__}: {first}",
        source=source,
        hint=f"Try --exporter {other}, or make the failing code export-friendly "
        "(see https://pytorch.org/docs/stable/generated/exportdb/index.html).",
    )
