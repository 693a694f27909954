"""A fixed recipe: a list of passes run one after the other, checked in full before any work."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import yaml

from slipstream.artifact.bundle import Bundle, refuse_existing
from slipstream.errors import ConfigError
from slipstream.passes.base import AnyPass, ModelKind, PassConfig, PassRun
from slipstream.passes.cache import PassCache
from slipstream.passes.catalogue import PassSpec, check_order, load_pass, lookup
from slipstream.passes.fidelity import load_inputs

PassRef: TypeAlias = str | tuple[str, Mapping[str, Any]]


@dataclass(frozen=True)
class ProgressEvent:
    """Sent before (``run`` is None) and after each pass."""

    index: int
    total: int
    step: str
    run: PassRun | None = None


Progress: TypeAlias = Callable[[ProgressEvent], None]


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so ``a=[x,y],b=1`` is two items."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in (s.strip() for s in parts) if p]


def parse_pass_ref(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:key=value,...]`` → (name, options). Values are YAML scalars or ``[a,b]`` lists."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"Expected key=value in pass options; got {item!r} in {text!r}.",
                field="pass",
                hint="Write e.g. --pass quantize.static:calibration=entropy,per_channel=true",
            )
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"Cannot read the value of {key!r} in {text!r}: {exc}.", field=key) from exc
    return name.strip(), options


def plan(passes: Sequence[PassRef], *, start: ModelKind = "onnx") -> list[tuple[PassSpec, AnyPass, PassConfig]]:
    """Look up, order-check, import and configure every pass; raises before any model work."""
    if not passes:
        raise ConfigError("A recipe needs at least one pass; got none.", field="passes", hint="Add --pass NAME.")
    named: list[tuple[PassSpec, Mapping[str, Any]]] = []
    for ref in passes:
        name, options = parse_pass_ref(ref) if isinstance(ref, str) else (ref[0], ref[1])
        named.append((lookup(name), options))
    check_order([spec for spec, _ in named], start=start)
    steps: list[tuple[PassSpec, AnyPass, PassConfig]] = []
    for spec, options in named:
        instance = load_pass(spec)
        steps.append((spec, instance, instance.make_config(options)))
    return steps


def optimize(
    bundle: Bundle | str | os.PathLike[str],
    passes: Sequence[PassRef],
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    cache: PassCache | bool = True,
    seed: int = 0,
    data: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """Run ``passes`` in order on ``bundle`` and write the result to ``output``.

    Each pass is ``"name"``, ``"name:key=value,..."`` or ``("name", {options})``. The whole recipe is
    checked (names, order by model kind, options, dependencies) before any work. The input bundle is
    not modified; the output's lineage grows by one entry per pass. ``cache=True`` uses the default
    cache directory (``$SLIPSTREAM_CACHE_DIR`` or the user cache dir); pass a PassCache or False.
    ``data`` is an .npz of real inputs named like the model's inputs: every pass measures its fidelity
    on it, and quantize.static calibrates on it unless given its own ``data``.
    """
    from slipstream.passes.runner import PassRunner

    source = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    steps = plan(passes)
    data_path = Path(data) if data is not None else None
    if data_path is not None:
        load_inputs(data_path, source.manifest.inputs)  # refuse bad data before any work
    target = Path(output)
    refuse_existing(target, overwrite=overwrite, what="the optimized bundle")
    runner = PassRunner(cache=resolve_cache(cache), seed=seed, data=data_path)
    return runner.run_chain(steps, source, target, overwrite=overwrite, progress=progress).bundle


def resolve_cache(cache: PassCache | bool) -> PassCache | None:
    """``True``: the default cache directory; ``False``: none; a PassCache: that one."""
    return PassCache.default() if cache is True else (cache or None)
