"""Example inputs, input names and dynamic axes for a PyTorch export.

Shapes are written like the CLI takes them: ``batch,1,8,8``; a name instead of a number is a dynamic
axis with that symbol. Declared axes are ``INPUT:AXIS=SYMBOL`` (one input) or ``AXIS=SYMBOL`` (every
input of high enough rank). Axis 0 of every input is the dynamic ``batch`` unless a shape fixes it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from slipstream.artifact.tensor import DTYPES, Dim
from slipstream.errors import ConfigError

if TYPE_CHECKING:
    import torch

DynamicAxes = dict[str, dict[int, str]]
BATCH = "batch"
# Example sizes for symbolic axes: 2 for the batch (torch.export specializes sizes 0 and 1), and
# distinct odd sizes for the others, so that no two axes look equal by accident.
EXAMPLE_BATCH = 2
EXAMPLE_SIZES = (7, 9, 11, 5, 3)

MISSING_EXAMPLES_HINT = (
    "Give example inputs: on the command line --input-shape batch,1,8,8 (repeat it per input; add "
    "--input-dtype int64 for token ids), or --sample-data sample.npz; in an entry-point file, a companion "
    "function `example_inputs()` (or `<factory>_example_inputs()`) returning a tensor or a tuple of tensors; "
    "from Python, slipstream.convert(model, out, example_inputs=(tensor,))."
)


def parse_shape(text: str) -> tuple[Dim, ...]:
    """``"batch,1,8,8"`` → ``("batch", 1, 8, 8)``."""
    dims: list[Dim] = []
    for part in (p.strip() for p in text.split(",")):
        if part.isdigit() and int(part) > 0:
            dims.append(int(part))
        elif part.isidentifier():
            dims.append(part)
        else:
            raise ConfigError(
                f"Input shape {text!r} has the dimension {part!r}; expected a positive size or a symbol name.",
                field="input_shape",
                hint="Write shapes like batch,1,8,8 or batch,seq (names are dynamic axes).",
            )
    if not dims:
        raise ConfigError("Input shape is empty.", field="input_shape", hint="Write shapes like batch,1,8,8.")
    return tuple(dims)


def parse_dynamic_axis(text: str) -> tuple[str | None, int, str]:
    """``"input_ids:1=seq"`` → ``("input_ids", 1, "seq")``; ``"1=seq"`` → ``(None, 1, "seq")``."""
    target, sep, symbol = text.partition("=")
    name, colon, axis = target.rpartition(":") if ":" in target else ("", "", target)
    if not sep or not axis.strip().isdigit() or not symbol.strip().isidentifier() or (colon and not name):
        raise ConfigError(
            f"Dynamic axis {text!r} is not of the form INPUT:AXIS=NAME or AXIS=NAME.",
            field="dynamic_axis",
            hint="For example input_ids:1=seq, or 1=seq for every input.",
        )
    return (name.strip() or None), int(axis), symbol.strip()


def forward_names(model: Any, count: int) -> list[str]:
    """The names of the first ``count`` positional arguments of ``model.forward``."""
    forward = getattr(model, "forward", model)
    schema = getattr(forward, "schema", None)  # a TorchScript method describes itself
    if schema is not None:
        names = [a.name for a in schema.arguments[1:]]
    else:
        try:
            params: list[inspect.Parameter] = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        names = []
        for p in params:
            if p.kind is p.VAR_POSITIONAL:
                break
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
    names = names[:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def bind_examples(model: Any, examples: Any) -> tuple[Any, list[str], tuple[torch.Tensor, ...]]:
    """Example inputs as (module to export, input names, positional tensors).

    A dict is matched to forward() by argument name, wherever those arguments sit: GPT-2 takes
    ``(input_ids, cache, attention_mask, ...)``, and ``{input_ids, attention_mask}`` must not feed the
    cache. When the names are not the first positional arguments, the module is wrapped so that the
    exported graph takes exactly the given inputs, in forward() order, and passes them by keyword.
    """
    import torch

    if isinstance(examples, torch.Tensor):
        examples = (examples,)
    if isinstance(examples, Mapping):
        names = _names_by_keyword(model, examples)
        args = tuple(examples[n] for n in names)
        _check_tensors(args)
        if names == forward_names(model, len(names)):
            return model, names, args
        return keyword_module(model, names), names, args
    _check_tensors(examples)
    return model, forward_names(model, len(examples)), tuple(examples)


def _check_tensors(examples: Any) -> None:
    import torch

    if not isinstance(examples, tuple | list) or not all(isinstance(t, torch.Tensor) for t in examples):
        raise ConfigError(
            f"Example inputs must be a tensor, a tuple of tensors or a dict of tensors; got {type(examples).__name__}.",
            field="example_inputs",
            hint=MISSING_EXAMPLES_HINT,
        )


def _names_by_keyword(model: Any, examples: Mapping[Any, Any]) -> list[str]:
    """The dict's keys in forward() order; unknown keys and missing required arguments fail by name."""
    keys = [str(k) for k in examples]
    if getattr(getattr(model, "forward", model), "schema", None) is not None:  # TorchScript: by position only
        names = forward_names(model, len(keys))
        if set(keys) != set(names):
            raise ConfigError(
                f"Example inputs are keyed {sorted(keys)}; the TorchScript forward() takes {names} first.",
                field="example_inputs",
                hint="Key example inputs by the first forward() argument names, or pass a tuple in order.",
            )
        return names
    try:
        params = list(inspect.signature(getattr(model, "forward", model)).parameters.values())
    except (TypeError, ValueError):
        return keys  # no signature to check against: the keys are the names, in the dict's order
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    known = {p.name for p in named}
    unknown = [k for k in keys if k not in known]
    required = [p.name for p in named if p.default is p.empty and p.name not in keys]
    if (unknown and not takes_any) or required:
        problem = (
            f"{unknown} are not forward() arguments" if unknown and not takes_any else f"forward() requires {required}"
        )
        raise ConfigError(
            f"Example inputs are keyed {keys}; forward() takes {[p.name for p in named]}: {problem}.",
            field="example_inputs",
            hint="Key example inputs by forward() argument names (any order; arguments with defaults may be "
            "left out), or pass a tuple in forward() order.",
        )
    return [p.name for p in named if p.name in keys] + unknown


def keyword_module(
    model: Any, names: Sequence[str], *, fixed: Mapping[str, Any] | None = None, pick: Sequence[str] = ()
) -> Any:
    """``model`` behind a forward() that takes ``names`` positionally and calls it by keyword.

    ``fixed`` keywords are added to every call (``use_cache=False``); ``pick`` selects fields of the
    output mapping (``logits``), so that the graph returns those tensors only. The wrapper's forward()
    carries a real signature (``input_ids, attention_mask``): torch.export binds dynamic shapes and input
    names to it, and a ``*args`` forward would nest them one level deeper.
    """
    import torch

    call_names, extra, fields = tuple(names), dict(fixed or {}), tuple(pick)

    class KeywordInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.train(bool(getattr(model, "training", False)))  # wrapping must not change the model's mode

        def forward(self, *tensors: Any) -> Any:
            out = self.inner(**dict(zip(call_names, tensors, strict=True)), **extra)
            if not fields:
                return out
            picked = tuple(out[f] for f in fields)
            return picked[0] if len(picked) == 1 else picked

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind) for n in ("self", *call_names)]
    KeywordInputs.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return KeywordInputs()


def examples_from_shapes(shapes: Sequence[tuple[Dim, ...]], dtypes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Random tensors of the given shapes; symbols get the example sizes above."""
    import torch

    if len(dtypes) not in (0, 1, len(shapes)):
        raise ConfigError(
            f"Got {len(dtypes)} input dtypes for {len(shapes)} input shapes.",
            field="input_dtype",
            hint="Give one --input-dtype for all inputs, or one per --input-shape.",
        )
    sizes: dict[str, int] = {BATCH: EXAMPLE_BATCH}
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for i, shape in enumerate(shapes):
        dtype_name = dtypes[i] if len(dtypes) == len(shapes) else (dtypes[0] if dtypes else "float32")
        if dtype_name not in DTYPES or dtype_name == "string":
            raise ConfigError(
                f"Input dtype {dtype_name!r} is not a tensor dtype.", field="input_dtype", hint="Use e.g. float32."
            )
        for d in shape:
            if isinstance(d, str) and d not in sizes:
                sizes[d] = EXAMPLE_SIZES[(len(sizes) - 1) % len(EXAMPLE_SIZES)]
        concrete = [d if isinstance(d, int) else sizes[d] for d in shape]
        dtype = getattr(torch, dtype_name)
        if dtype.is_floating_point:
            tensors.append(torch.randn(concrete, generator=generator).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, concrete, generator=generator).bool())
        else:
            tensors.append(torch.randint(0, 10, concrete, generator=generator).to(dtype))
    return tuple(tensors)


def resolve_axes(
    names: Sequence[str],
    examples: Sequence[torch.Tensor],
    *,
    shapes: Sequence[tuple[Dim, ...]] = (),
    declared: Mapping[str, Mapping[int, str]] | Sequence[str] | None = None,
) -> DynamicAxes:
    """Which axis of which input is dynamic, under what symbol."""
    axes: DynamicAxes = {n: ({0: BATCH} if t.dim() > 0 else {}) for n, t in zip(names, examples, strict=True)}
    for name, shape in zip(names, shapes, strict=False):
        axes[name] = {i: d for i, d in enumerate(shape) if isinstance(d, str)}
    items: list[tuple[str | None, int, str]] = []
    if isinstance(declared, Mapping):
        items = [(n, int(a), s) for n, per in declared.items() for a, s in per.items()]
    elif declared:
        items = [parse_dynamic_axis(text) for text in declared]
    for target, axis, symbol in items:
        if target is not None and target not in axes:
            raise ConfigError(
                f"Dynamic axis names input {target!r}; the model's inputs are {list(names)}.",
                field="dynamic_axis",
                hint="Use a forward() argument name, or AXIS=NAME for every input.",
            )
        for name, tensor in zip(names, examples, strict=True):
            if target in (None, name) and axis < tensor.dim():
                axes[name][axis] = symbol
            elif target == name:
                raise ConfigError(
                    f"Input {name!r} has rank {tensor.dim()}; it has no axis {axis}.", field="dynamic_axis"
                )
    return axes


def widen_examples(examples: Sequence[torch.Tensor], names: Sequence[str], axes: DynamicAxes) -> tuple[Any, ...]:
    """Repeat size-1 dynamic axes to size 2: torch.export fixes an axis whose example size is 0 or 1."""
    import torch

    out = []
    for name, tensor in zip(names, examples, strict=True):
        for axis in axes.get(name, {}):
            if tensor.shape[axis] == 1:
                tensor = torch.cat([tensor, tensor], dim=axis)
        out.append(tensor)
    return tuple(out)
