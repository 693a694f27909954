"""prune.unstructured: zero individual weights by magnitude, at random, or by Taylor importance.

The masks are made permanent before export (no ``weight_orig``/``weight_mask`` left behind). Sparse
weights compress well but do not run faster in onnxruntime; use prune.structured for speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, JsonValue

from slipstream.errors import ConfigError
from slipstream.passes.base import PassConfig
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_base import TorchContext, TorchPass, TorchPassOutput
from slipstream.passes.torch_model import TorchData, TorchModel, loss_fn, require_torch


class PruneUnstructuredConfig(PassConfig):
    amount: float = Field(gt=0, lt=1, description="Fraction of weights set to zero.")
    method: Literal["magnitude", "random", "taylor"] = Field(
        default="magnitude", description="Which weights go: smallest |w|, random, or smallest |w · ∂L/∂w|."
    )
    scope: Literal["layer", "global"] = Field(
        default="layer", description="The same fraction in every layer, or one ranking over all of them."
    )
    taylor_batches: int = Field(default=8, ge=1, description="Batches used to accumulate gradients for 'taylor'.")
    batch_size: int = Field(default=64, ge=1, description="Batch size for the Taylor gradients.")
    seed: int = Field(default=0, description="Seed for 'random'.")


@dataclass(frozen=True)
class UnstructuredReport:
    weights: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.weights, 1)


def _targets(module: Any) -> list[tuple[Any, str]]:
    import torch.nn as nn

    return [(m, "weight") for m in module.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]


def _taylor_scores(
    module: Any, targets: list[tuple[Any, str]], data: TorchData, config: PruneUnstructuredConfig
) -> None:
    """Store |w · ∂L/∂w| in each weight's ``.grad``-shaped score attribute for the importance prune."""
    module.train()
    module.zero_grad()
    loss = loss_fn(data.task)
    for i, (x, y) in enumerate(data.batches(config.batch_size, shuffle=True, seed=config.seed)):
        if i >= config.taylor_batches:
            break
        loss(module(x), y).backward()
    module.eval()
    for m, name in targets:
        weight = getattr(m, name)
        m._slipstream_taylor = (weight.detach() * weight.grad.detach()).abs()
    module.zero_grad()


def prune_unstructured(
    model: TorchModel, config: PruneUnstructuredConfig, data: TorchData | None = None
) -> tuple[TorchModel, UnstructuredReport]:
    """A copy of ``model`` with ``amount`` of its Linear/Conv weights zeroed, masks made permanent."""
    require_torch("prune.unstructured")
    import torch
    import torch.nn.utils.prune as torch_prune

    prune: Any = torch_prune  # its functions carry no annotations

    if config.method == "taylor" and data is None:
        raise ConfigError(
            "prune.unstructured with method 'taylor' needs training data for the gradients; none was given.",
            field="method",
            hint="Give training data, or use method magnitude or random.",
        )
    out = model.copy()
    module = out.module
    targets = _targets(module)
    if not targets:
        raise ConfigError("prune.unstructured found no Linear or Conv layers to prune.", field="amount")
    torch.manual_seed(config.seed)
    if config.method == "taylor" and data is not None:
        _taylor_scores(module, targets, data, config)
        scores = {(id(m), n): m._slipstream_taylor for m, n in targets}
        if config.scope == "global":
            prune.global_unstructured(
                targets,
                pruning_method=prune.L1Unstructured,
                importance_scores={(m, n): scores[(id(m), n)] for m, n in targets},
                amount=config.amount,
            )
        else:
            for m, n in targets:
                prune.l1_unstructured(m, n, amount=config.amount, importance_scores=scores[(id(m), n)])
        for m, _ in targets:
            del m._slipstream_taylor
    elif config.scope == "global":
        method = prune.L1Unstructured if config.method == "magnitude" else prune.RandomUnstructured
        prune.global_unstructured(targets, pruning_method=method, amount=config.amount)
    else:
        for m, n in targets:
            if config.method == "magnitude":
                prune.l1_unstructured(m, n, amount=config.amount)
            else:
                prune.random_unstructured(m, n, amount=config.amount)
    for m, n in targets:
        prune.remove(m, n)  # permanent: the zeros live in the weight itself
    weights = sum(getattr(m, n).numel() for m, n in targets)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in targets)
    return out, UnstructuredReport(weights=weights, zeros=zeros)


class PruneUnstructured(TorchPass[PruneUnstructuredConfig]):
    """prune.unstructured@1: zero individual weights, masks made permanent."""

    name = "prune.unstructured"
    version = 1
    Config = PruneUnstructuredConfig
    tolerance = Tolerance(min_top1=0.9)  # at 30 % of the weights, before fine-tuning

    def apply(self, model: TorchModel, config: PruneUnstructuredConfig, ctx: TorchContext) -> TorchPassOutput:
        pruned, report = prune_unstructured(model, config, ctx.train)
        metrics: dict[str, JsonValue] = {"sparsity": report.sparsity, "weights": report.weights}
        return TorchPassOutput(
            pruned, {"note": "sparse weights shrink compressed size, not onnxruntime latency"}, metrics
        )
