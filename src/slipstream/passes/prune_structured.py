"""prune.structured: remove whole channels and neurons so the model really shrinks.

Built on torch-pruning's dependency graph, so coupled layers (residual adds, concatenations, batch
norms) are pruned together and the network stays valid. Importance is the
L1 or L2 norm of each group's weights, random (a baseline), or first-order Taylor |w · ∂L/∂w|
accumulated on a data sample. The output layer is never pruned (its width is the model's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, JsonValue

from slipstream.errors import ConfigError
from slipstream.passes.base import PassConfig
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_base import TorchContext, TorchPass, TorchPassOutput
from slipstream.passes.torch_model import TorchData, TorchModel, count_macs, evaluate, loss_fn, require_torch


class PruneStructuredConfig(PassConfig):
    amount: float = Field(gt=0, lt=1, description="Fraction of channels/neurons removed from each prunable layer.")
    importance: Literal["l1", "l2", "random", "taylor"] = Field(
        default="l2", description="How channels are ranked; 'taylor' needs training data."
    )
    scope: Literal["layer", "global"] = Field(
        default="layer", description="Same ratio in every layer, or one global ranking across layers."
    )
    ignore: tuple[str, ...] = Field(default=(), description="Module names never to prune (the output layer always).")
    round_to: int | None = Field(default=None, ge=1, description="Keep channel counts a multiple of this.")
    taylor_batches: int = Field(default=8, ge=1, description="Batches of data used to accumulate Taylor scores.")
    batch_size: int = Field(default=64, ge=1, description="Batch size for the Taylor scores.")
    seed: int = Field(default=0, description="Seed for random importance.")


@dataclass(frozen=True)
class StructuredReport:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    pruned_layers: int

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)


def _output_layer(module: Any) -> Any:
    """The last Linear or Conv in definition order: the layer that produces the outputs."""
    import torch.nn as nn

    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.modules.conv._ConvNd):
            last = sub
    return last


def _importance(config: PruneStructuredConfig) -> Any:
    import torch_pruning as tp

    if config.importance == "random":
        return tp.importance.RandomImportance()
    if config.importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if config.importance == "l1" else 2)


def prune_structured(
    model: TorchModel, config: PruneStructuredConfig, data: TorchData | None = None
) -> tuple[TorchModel, StructuredReport]:
    """A pruned copy of ``model``; the input model is not changed."""
    require_torch("prune.structured")
    import torch
    import torch.nn as nn
    import torch_pruning as tp

    if config.importance == "taylor" and data is None:
        raise ConfigError(
            "prune.structured with importance 'taylor' needs training data for the gradients; none was given.",
            field="importance",
            hint="Give training data (recipe data.train), or use importance l1, l2 or random.",
        )
    out = model.copy()
    module = out.module
    names = dict(module.named_modules())
    unknown = [n for n in config.ignore if n not in names]
    if unknown:
        raise ConfigError(
            f"prune.structured: ignore lists modules the model does not have: {unknown}.",
            field="ignore",
            hint=f"Module names look like: {', '.join(list(names)[1:6])}.",
        )
    ignored = [names[n] for n in config.ignore]
    head = _output_layer(module)
    if head is not None:
        ignored.append(head)
    # Attention blocks keep their width: nn.MultiheadAttention cannot express fewer heads than its
    # embedding allows, so its projections are left whole and only the layers around it are pruned.
    ignored.extend(m for m in module.modules() if isinstance(m, nn.MultiheadAttention))
    torch.manual_seed(config.seed)
    macs_before, params_before = count_macs(module, out.example_inputs)
    module.eval()
    pruner = tp.pruner.MetaPruner(
        module,
        out.example_inputs,
        importance=_importance(config),
        pruning_ratio=config.amount,
        global_pruning=config.scope == "global",
        ignored_layers=ignored,
        round_to=config.round_to,
    )
    if config.importance == "taylor" and data is not None:
        module.train()
        module.zero_grad()
        loss = loss_fn(data.task)
        for i, (x, y) in enumerate(data.batches(config.batch_size, shuffle=True, seed=config.seed)):
            if i >= config.taylor_batches:
                break
            loss(module(x), y).backward()
        module.eval()
    pruned = 0
    for group in pruner.step(interactive=True):
        group.prune()
        pruned += 1
    module.zero_grad()
    macs_after, params_after = count_macs(module, out.example_inputs)
    report = StructuredReport(
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=params_after,
        pruned_layers=pruned,
    )
    return out, report


class PruneStructured(TorchPass[PruneStructuredConfig]):
    """prune.structured@1: remove channels and neurons (torch-pruning dependency graph)."""

    name = "prune.structured"
    version = 1
    Config = PruneStructuredConfig
    # Removing a quarter of the channels, before fine-tuning: most predictions stay.
    tolerance = Tolerance(min_top1=0.8)

    def apply(self, model: TorchModel, config: PruneStructuredConfig, ctx: TorchContext) -> TorchPassOutput:
        pruned, report = prune_structured(model, config, ctx.train)
        metrics: dict[str, JsonValue] = {
            "macs_before": report.macs_before,
            "macs_after": report.macs_after,
            "macs_ratio": report.macs_ratio,
            "params_before": report.params_before,
            "params_after": report.params_after,
        }
        if ctx.eval is not None:
            metrics["eval_metric_after"] = evaluate(pruned.module, ctx.eval)
        return TorchPassOutput(pruned, {"importance": config.importance, "scope": config.scope}, metrics)
