"""prune.structured: remove whole channels and neurons so the model really shrinks.

Built on torch-pruning's dependency graph, so coupled layers (residual adds, concatenations, batch
norms) are pruned together and the network stays valid. Importance is the
L1 or L2 norm of each group's weights, random (a baseline), or first-order Taylor |w · ∂L/∂w|
accumulated on a data sample. The output layer is never pruned (its width is the model's output).

Attention is slimmed by :mod:`slim_attention`: whole heads of ``nn.MultiheadAttention`` (rebuilt with fewer
heads) and, in ``transformers`` encoders of the BERT family, whole heads and feed-forward neurons, ranked
by weight norms, output norms or a Taylor score on unlabeled text (see :mod:`slim_importance`). A BERT-family
encoder is slimmed only there: its hidden width, shared by every residual connection, stays.
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
    importance: Literal["l1", "l2", "random", "taylor", "output_norm"] = Field(
        default="l2",
        description="How channels, neurons and heads are ranked; 'taylor' needs data (training data, or text for "
        "a text model); 'output_norm' (the units' mean output norm on data) applies to attention models only.",
    )
    heads: float | None = Field(
        default=None, ge=0, lt=1, description="Fraction of attention heads removed per layer; None: amount."
    )
    tokenizer: str | None = Field(
        default=None,
        description="Folder of the tokenizer for a text model's importance scores (on unlabeled text from "
        "installed packages' READMEs); None: the folder the transformers model was loaded from.",
    )
    text_samples: int = Field(default=256, ge=1, description="Texts (or data rows) scored for 'taylor'/'output_norm'.")
    seq_len: int = Field(default=64, ge=2, description="Tokens per text for a text model's importance scores.")
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
    heads_before: int = 0
    heads_after: int = 0
    ffn_before: int = 0
    ffn_after: int = 0

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

    from slipstream.passes.slim_sites import has_attention, is_bert_layer

    known = dict(model.module.named_modules())
    unknown = [n for n in config.ignore if n not in known]
    if unknown:
        raise ConfigError(
            f"prune.structured: ignore lists modules the model does not have: {unknown}.",
            field="ignore",
            hint=f"Module names look like: {', '.join(list(known)[1:6])}.",
        )
    if any(is_bert_layer(m) for m in model.module.modules()):
        return _slim_encoder(model, config, data, with_ffn=True)
    if config.importance == "output_norm":
        raise ConfigError(
            "prune.structured importance 'output_norm' ranks attention heads and transformer feed-forward "
            "neurons; this model is pruned by channel groups, which it does not rank.",
            field="importance",
            hint="Use importance l1, l2, random or taylor.",
        )
    if config.importance == "taylor" and data is None:
        raise ConfigError(
            "prune.structured with importance 'taylor' needs training data for the gradients; none was given.",
            field="importance",
            hint="Give training data (recipe data.train), or use importance l1, l2 or random.",
        )
    out = model.copy()
    module = out.module
    names = dict(module.named_modules())
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
    heads = StructuredReport(0, 0, 0, 0, 0)
    if has_attention(module) and _heads(config) > 0:
        out, heads = _slim_encoder(out, config, data, with_ffn=False)
        module = out.module
    macs_after, params_after = count_macs(module, out.example_inputs)
    report = StructuredReport(
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=params_after,
        pruned_layers=pruned + heads.pruned_layers,
        heads_before=heads.heads_before,
        heads_after=heads.heads_after,
    )
    return out, report


def _heads(config: PruneStructuredConfig) -> float:
    return config.amount if config.heads is None else config.heads


def _slim_encoder(
    model: TorchModel, config: PruneStructuredConfig, data: TorchData | None, *, with_ffn: bool
) -> tuple[TorchModel, StructuredReport]:
    """Heads (and, in a transformers encoder, feed-forward neurons) removed by :func:`slim_attention`."""
    from slipstream.passes.slim_attention import (
        SlimSettings,
        data_batches,
        slim_attention,
        text_batches,
        tokenizer_path,
    )
    from slipstream.passes.slim_importance import DATA_IMPORTANCE
    from slipstream.passes.text_corpus import unlabeled_text

    batches = None
    if config.importance in DATA_IMPORTANCE:
        if data is not None and len(model.example_inputs) == 1:
            batches = data_batches(data, config.batch_size, config.text_samples)
        elif with_ffn:
            texts = unlabeled_text(config.text_samples)
            path = tokenizer_path(model.module, config.tokenizer)
            batches = text_batches(path, texts, inputs=len(model.example_inputs), batch_size=config.batch_size,
                                   seq_len=config.seq_len)  # fmt: skip
    settings = SlimSettings(
        heads=_heads(config), ffn=config.amount if with_ffn else 0.0, importance=config.importance,
        scope=config.scope, round_to=config.round_to, ignore=config.ignore, seed=config.seed,
    )  # fmt: skip
    macs_before, _ = count_macs(model.module, model.example_inputs)
    out, slim = slim_attention(model, settings, batches)
    macs_after, _ = count_macs(out.module, out.example_inputs)
    report = StructuredReport(
        macs_before=macs_before, macs_after=macs_after, params_before=slim.params_before,
        params_after=slim.params_after, pruned_layers=slim.pruned_sites,
        heads_before=slim.heads_before, heads_after=slim.heads_after, ffn_before=slim.ffn_before,
        ffn_after=slim.ffn_after,
    )  # fmt: skip
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
        if report.heads_before:
            metrics.update(heads_before=report.heads_before, heads_after=report.heads_after)
        if report.ffn_before:
            metrics.update(ffn_before=report.ffn_before, ffn_after=report.ffn_after)
        if ctx.eval is not None:
            metrics["eval_metric_after"] = evaluate(pruned.module, ctx.eval)
        return TorchPassOutput(pruned, {"importance": config.importance, "scope": config.scope}, metrics)
