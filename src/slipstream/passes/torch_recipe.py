"""Recipes that start from a torch model: [torch passes] → export → [ONNX passes]."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from slipstream.artifact.bundle import Bundle, refuse_existing
from slipstream.artifact.hashing import sha256_json
from slipstream.passes.cache import PassCache
from slipstream.passes.recipe import PassRef, Progress, plan, resolve_cache
from slipstream.passes.runner import ChainRun, PassRunner, PlannedStep, fingerprint
from slipstream.passes.torch_model import TorchData, TorchModel


def optimize_torch(
    model: TorchModel,
    passes: Sequence[PassRef],
    output: str | os.PathLike[str],
    *,
    name: str = "model",
    train: TorchData | None = None,
    eval_data: TorchData | None = None,
    overwrite: bool = False,
    cache: PassCache | bool = True,
    seed: int = 0,
    data: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """Run torch passes on ``model`` (never changed), export it with a parity proof, then the ONNX passes.

    See :func:`run_torch_recipe`; this returns only the bundle.
    """
    return run_torch_recipe(
        model, passes, output, name=name, train=train, eval_data=eval_data, overwrite=overwrite, cache=cache,
        seed=seed, data=data, progress=progress,
    ).bundle  # fmt: skip


def run_torch_recipe(
    model: TorchModel,
    passes: Sequence[PassRef],
    output: str | os.PathLike[str],
    *,
    name: str = "model",
    train: TorchData | None = None,
    eval_data: TorchData | None = None,
    overwrite: bool = False,
    cache: PassCache | bool = True,
    seed: int = 0,
    data: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    on_cache: Callable[[bool], None] | None = None,
) -> ChainRun:
    """Run a torch recipe and say how much of it the cache answered.

    When the recipe has no ``export`` step, one with default settings is added after the torch passes.
    The model before any pass is the teacher for distillation. ``train`` feeds fine-tuning and Taylor
    importance; ``eval_data`` drives early stopping. The exported bundle is cached under a key that
    chains the model's fingerprint and every torch step's (name, config, seed, data), so an unchanged
    recipe re-uses it without training again. ``progress`` hears each step (a torch step also when the
    cache answers it); ``on_cache`` hears first whether the cache holds the export (True: no torch pass runs).
    """
    steps = plan(passes, start="torch")
    if all(spec.output_kind == "torch" for spec, _, _ in steps):
        steps = plan([*passes, "export"], start="torch")
    target = Path(output)
    refuse_existing(target, overwrite=overwrite, what="the optimized bundle")
    runner = PassRunner(
        cache=resolve_cache(cache),
        seed=seed,
        data=Path(data) if data is not None else None,
        train=train,
        eval=eval_data,
        teacher=model.copy().module,  # distillation may switch it to eval mode: never the caller's
    )
    if on_cache is not None:
        on_cache(export_cached(runner, steps, model, name))
    return runner.run_chain(steps, model, target, name=name, overwrite=overwrite, progress=progress)


def _torch_steps(steps: Sequence[PlannedStep]) -> int:
    return next((k for k, (_, p, _) in enumerate(steps) if p.output_kind != "torch"), len(steps))


def export_cached(runner: PassRunner, steps: Sequence[PlannedStep], model: TorchModel, name: str) -> bool:
    """Whether ``runner``'s pass cache holds the export after the torch steps of ``steps`` (so none of them
    would run). The key is the one :meth:`PassRunner.run_chain` looks up: the model's fingerprint chained
    through each torch step, with the example inputs' shapes, then the export step's config and name."""
    n_torch = _torch_steps(steps)
    if runner.cache is None or n_torch == 0 or n_torch == len(steps):
        return False
    fp = fingerprint(model)
    for _, p, cfg in steps[:n_torch]:
        fp = runner.torch_key(p, fp, cfg)
    shapes = [f"{tuple(getattr(x, 'shape', ()))}:{getattr(x, 'dtype', type(x).__name__)}" for x in model.example_inputs]
    _, exporter, export_cfg = steps[n_torch]
    key = runner.bundle_key(exporter, sha256_json([fp, shapes]), export_cfg, name)
    return runner.cache.entry_path(key).is_dir()
