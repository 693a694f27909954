"""train.finetune: recovery training after pruning, optionally distilled from the original model.

SGD with momentum or Adam; exponential, cosine or step learning-rate decay; gradient-norm clipping;
shuffling; early stopping on the evaluation metric (the best weights are kept); knowledge distillation
from a teacher (the model before pruning) with a temperature and a mixing weight.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, JsonValue

from slipstream.errors import ConfigError
from slipstream.passes.base import PassConfig
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_base import TorchContext, TorchPass, TorchPassOutput
from slipstream.passes.torch_model import TorchData, TorchModel, evaluate, loss_fn, require_torch


class FinetuneConfig(PassConfig):
    epochs: int = Field(default=5, ge=1, description="Passes over the training data (at most).")
    batch_size: int = Field(default=64, ge=1, description="Rows per optimizer step.")
    optimizer: Literal["sgd", "adam"] = Field(default="adam", description="SGD with momentum, or Adam.")
    lr: float = Field(default=1e-3, gt=0, description="Initial learning rate.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 penalty.")
    schedule: Literal["none", "exponential", "cosine", "step"] = Field(
        default="cosine", description="Learning-rate decay, stepped once per epoch."
    )
    gamma: float = Field(default=0.5, gt=0, le=1, description="Decay factor for exponential and step schedules.")
    step_epochs: int = Field(default=2, ge=1, description="Epochs between decays for the step schedule.")
    clip_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the gradient norm to this; None: off.")
    shuffle: bool = Field(default=True, description="Shuffle the training rows every epoch.")
    patience: int | None = Field(
        default=2, ge=1, description="Stop after this many epochs without improvement on eval data; None: off."
    )
    distill_alpha: float = Field(
        default=0.0, ge=0, le=1, description="Weight of the teacher's soft targets in the loss (0: no distillation)."
    )
    temperature: float = Field(default=2.0, gt=0, description="Softening temperature for distillation.")
    seed: int = Field(default=0, description="Seed for shuffling and initialisation.")


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    metric: float | None
    lr: float


@dataclass
class FinetuneReport:
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float | None = None
    stopped_early: bool = False


Progress = Callable[[EpochStats], None]


def _schedule(opt: Any, config: FinetuneConfig) -> Any:
    import torch

    if config.schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.gamma)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_epochs, gamma=config.gamma)
    return None


def _distill_loss(student: Any, teacher: Any, temperature: float) -> Any:
    import torch.nn.functional as F  # noqa: N812

    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.softmax(teacher / t, dim=-1), reduction="batchmean") * t * t


def finetune(
    model: TorchModel,
    config: FinetuneConfig,
    train: TorchData,
    eval_data: TorchData | None = None,
    *,
    teacher: Any = None,
    progress: Progress | None = None,
) -> tuple[TorchModel, FinetuneReport]:
    """A trained copy of ``model``; with ``eval_data`` the best epoch's weights are returned."""
    require_torch("train.finetune")
    import torch

    if config.distill_alpha > 0 and teacher is None:
        raise ConfigError(
            "train.finetune with distill_alpha > 0 needs a teacher model; none was given.",
            field="distill_alpha",
            hint="Set distill_alpha: 0, or run it after a pruning pass in a recipe (the unpruned model teaches).",
        )
    if config.distill_alpha > 0 and train.task != "classification":
        raise ConfigError("Distillation needs a classifier (soft targets over classes).", field="distill_alpha")
    torch.manual_seed(config.seed)
    out = model.copy()
    module = out.module
    params = [p for p in module.parameters() if p.requires_grad]
    opt: Any = (
        torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        if config.optimizer == "sgd"
        else torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    )
    scheduler = _schedule(opt, config)
    criterion = loss_fn(train.task)
    report = FinetuneReport()
    best_state: dict[str, Any] | None = None
    bad_epochs = 0
    if teacher is not None:
        teacher.eval()
    for epoch in range(1, config.epochs + 1):
        module.train()
        total, rows = 0.0, 0
        for x, y in train.batches(config.batch_size, shuffle=config.shuffle, seed=config.seed + epoch):
            opt.zero_grad()
            logits = module(x)
            loss = criterion(logits, y)
            if config.distill_alpha > 0:
                with torch.no_grad():
                    soft = teacher(x)
                loss = (1 - config.distill_alpha) * loss + config.distill_alpha * _distill_loss(
                    logits, soft, config.temperature
                )
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(y)
            rows += len(y)
        lr = float(opt.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        metric = evaluate(module, eval_data) if eval_data is not None else None
        stats = EpochStats(epoch=epoch, loss=total / rows, metric=metric, lr=lr)
        report.history.append(stats)
        if progress is not None:
            progress(stats)
        if metric is None:
            continue
        if report.best_metric is None or metric > report.best_metric:
            report.best_metric, report.best_epoch, bad_epochs = metric, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            bad_epochs += 1
            if config.patience is not None and bad_epochs >= config.patience:
                report.stopped_early = True
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return out, report


class Finetune(TorchPass[FinetuneConfig]):
    """train.finetune@1: recovery training (optionally distilled from the model before the torch passes)."""

    name = "train.finetune"
    version = 1
    Config = FinetuneConfig
    tolerance = Tolerance(min_top1=0.9)  # one epoch on a trained model moves few predictions

    def apply(self, model: TorchModel, config: FinetuneConfig, ctx: TorchContext) -> TorchPassOutput:
        if ctx.train is None:
            raise ConfigError(
                "train.finetune needs labeled training data; none was given.",
                field="data",
                hint="Give training data with a 'labels' array (recipe data.train, or --train-data); a build with "
                "a label-free metric (cosine, agreement) skips fine-tuning candidates when there are no labels.",
            )
        teacher = ctx.teacher if config.distill_alpha > 0 else None
        trained, report = finetune(model, config, ctx.train, ctx.eval, teacher=teacher)
        metrics: dict[str, JsonValue] = {
            "epochs_run": len(report.history),
            "best_epoch": report.best_epoch,
            "best_eval_metric": report.best_metric,
            "stopped_early": report.stopped_early,
            "final_loss": report.history[-1].loss if report.history else None,
        }
        return TorchPassOutput(trained, {"optimizer": config.optimizer, "schedule": config.schedule}, metrics)
