"""Recipes that start from a torch model: [torch passes] → export → [ONNX passes]."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slipstream.artifact.bundle import Bundle, refuse_existing
from slipstream.passes.cache import PassCache
from slipstream.passes.export import ExportConfig, ExportOnnx
from slipstream.passes.recipe import PassRef, Progress, ProgressEvent, optimize, plan
from slipstream.passes.torch_base import TorchContext, TorchPass
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

    When the recipe has no ``export`` step, one with default settings is added after the torch passes.
    The model before any pass is the teacher for distillation. ``train`` feeds fine-tuning and Taylor
    importance; ``eval_data`` drives early stopping.
    """
    steps = plan(passes, start="torch")
    if not any(isinstance(inst, ExportOnnx) for _, inst, _ in steps):
        steps = plan([*passes, "export"], start="torch")
    split = next(i for i, (_, inst, _) in enumerate(steps) if isinstance(inst, ExportOnnx))
    target = Path(output)
    refuse_existing(target, overwrite=overwrite, what="the optimized bundle")
    ctx = TorchContext(train=train, eval=eval_data, teacher=model.copy().module, seed=seed)
    current = model
    total = len(steps)
    for i, (spec, instance, config) in enumerate(steps[:split]):
        if progress is not None:
            progress(ProgressEvent(i, total, spec.step_name))
        if not isinstance(instance, TorchPass):  # check_order guarantees torch kind before export
            raise TypeError(f"{spec.step_name} is not a torch pass")
        current = instance.run(current, config, ctx)
    export_spec, exporter, export_config = steps[split]
    if progress is not None:
        progress(ProgressEvent(split, total, export_spec.step_name))
    onnx_steps: list[Any] = [(s.name, c.model_dump()) for s, _, c in steps[split + 1 :]]
    if not isinstance(exporter, ExportOnnx) or not isinstance(export_config, ExportConfig):
        raise TypeError("the export step is not an ExportOnnx pass")
    if not onnx_steps:
        return exporter.export(current, target, export_config, name=name, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.torch-", dir=target.parent) as tmp:
        exported = exporter.export(current, Path(tmp) / "exported", export_config, name=name)

        def shifted(event: ProgressEvent) -> None:
            if progress is not None:
                progress(ProgressEvent(event.index + split + 1, total, event.step, event.run))

        return optimize(
            exported, onnx_steps, target, overwrite=overwrite, cache=cache, seed=seed, data=data, progress=shifted
        )
