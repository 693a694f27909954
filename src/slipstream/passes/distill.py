"""train.distill: recovery by distillation, training a slimmed model to reproduce its original, with no labels.

The target is whatever the teacher returns: a sentence embedding, ``last_hidden_state`` or logits. The loss
is their mean squared error or one minus their cosine along the last axis. The teacher runs once per batch
(its outputs are kept), the student trains with Adam, a cosine learning-rate decay and gradient clipping;
batches come round again in a new seeded order each epoch, so a run is deterministic under its seed.

As a pass, the teacher is the model before the recipe's torch passes. A single-input model trains on the
inputs of the training data (its labels are not read); a text model on unlabeled text of installed packages
(:mod:`text_corpus`), tokenized by its own tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, JsonValue

from slipstream.errors import ConfigError
from slipstream.passes.base import PassConfig
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_base import TorchContext, TorchPass, TorchPassOutput
from slipstream.passes.torch_model import TorchModel, require_torch

Batch = tuple[Any, ...]
Progress = Callable[[int, float], None]  # (step, loss)


class DistillConfig(PassConfig):
    steps: int = Field(default=300, ge=1, description="Optimizer steps (batches) to train for.")
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate (Adam), decayed by a cosine to 0.")
    loss: Literal["mse", "cosine"] = Field(
        default="mse", description="Distance to the teacher's outputs: mean squared error, or 1 - cosine."
    )
    clip_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the gradient norm; None: off.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay (AdamW).")
    dropout: bool = Field(
        default=False, description="Train with the model's dropout on; off matches the teacher more closely."
    )
    seed: int = Field(default=0, description="Seed for the batch order.")
    batch_size: int = Field(default=32, ge=1, description="Rows (or texts) per step.")
    texts: int = Field(default=4000, ge=1, description="Texts of the unlabeled corpus, for a text model.")
    seq_len: int = Field(default=64, ge=2, description="Tokens per text, for a text model.")
    tokenizer: str | None = Field(
        default=None,
        description="Folder of a text model's tokenizer; None: the folder the transformers model was loaded from.",
    )


@dataclass
class DistillReport:
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else float("nan")


def distance(student: Any, teacher: Any, loss: Literal["mse", "cosine"]) -> Any:
    import torch.nn.functional as F  # noqa: N812

    if loss == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


def distill(
    model: TorchModel,
    teacher: Any,
    batches: Sequence[Batch],
    config: DistillConfig,
    *,
    progress: Progress | None = None,
) -> tuple[TorchModel, DistillReport]:
    """A copy of ``model`` trained toward ``teacher``'s outputs on ``batches``; neither input is changed."""
    require_torch("distillation")
    import torch

    from slipstream.passes.slim_importance import main_output

    if not batches:
        raise ValueError("distill needs at least one batch")  # callers build the batches
    torch.manual_seed(config.seed)
    out = model.copy()
    student = out.module
    was_training = teacher.training
    teacher.eval()
    targets: dict[int, Any] = {}
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    report = DistillReport()
    started = time.perf_counter()
    order: list[int] = []
    epoch = 0
    student.train(config.dropout)
    try:
        for step in range(config.steps):
            if not order:
                g = torch.Generator().manual_seed(config.seed + epoch)
                order = torch.randperm(len(batches), generator=g).tolist()
                epoch += 1
            index = order.pop()
            batch = batches[index]
            if index not in targets:
                with torch.no_grad():
                    targets[index] = main_output(teacher(*batch)).detach()
            opt.zero_grad()
            loss = distance(main_output(student(*batch)), targets[index], config.loss)
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            opt.step()
            sched.step()
            report.losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, report.losses[-1])
    finally:
        teacher.train(was_training)
        student.eval()
    report.seconds = time.perf_counter() - started
    return out, report


def gap(model: Any, teacher: Any, batches: Sequence[Batch], loss: Literal["mse", "cosine"] = "mse") -> float:
    """The mean distance between ``model``'s and ``teacher``'s outputs over ``batches`` (both in eval mode)."""
    import torch

    from slipstream.passes.slim_importance import main_output

    model.eval()
    teacher.eval()
    with torch.no_grad():
        values = [float(distance(main_output(model(*b)), main_output(teacher(*b)), loss)) for b in batches]
    return sum(values) / len(values)


def pass_batches(model: TorchModel, config: DistillConfig, ctx: TorchContext) -> tuple[list[Batch], str]:
    """What the pass trains on, and a note saying what it was."""
    from slipstream.passes.slim_attention import data_batches, text_batches, tokenizer_path
    from slipstream.passes.slim_sites import is_bert_layer
    from slipstream.passes.text_corpus import unlabeled_text

    if ctx.train is not None and len(model.example_inputs) == 1:
        rows = len(ctx.train.inputs)
        return data_batches(ctx.train, config.batch_size, rows), f"training data inputs ({rows} rows, labels unused)"
    if any(is_bert_layer(m) for m in model.module.modules()):
        texts = unlabeled_text(config.texts)
        path = tokenizer_path(model.module, config.tokenizer)
        batches = text_batches(path, texts, inputs=len(model.example_inputs), batch_size=config.batch_size,
                               seq_len=config.seq_len)  # fmt: skip
        return batches, f"{len(texts)} texts of installed packages' READMEs and docstrings, tokenized by {path}"
    raise ConfigError(
        "train.distill needs inputs to run the teacher on: training data for a single-input model, or a "
        "transformers text encoder (trained on text at hand); this model has neither.",
        field="data",
        hint="Give training data (recipe data.train; labels are not needed beyond its shape), or distill in code "
        "with slipstream.passes.distill.distill(model, teacher, batches, config).",
    )


class Distill(TorchPass[DistillConfig]):
    """train.distill@1: label-free recovery toward the model before the torch passes."""

    name = "train.distill"
    version = 1
    Config = DistillConfig
    tolerance = Tolerance(min_top1=0.9)  # it trains toward the teacher: predictions move toward the original

    def apply(self, model: TorchModel, config: DistillConfig, ctx: TorchContext) -> TorchPassOutput:
        if ctx.teacher is None:
            raise ConfigError(
                "train.distill needs a teacher (the model before the torch passes); none was given.",
                field="teacher",
                hint="Run it in a recipe after a pruning pass (the unpruned model teaches), or pass a teacher.",
            )
        batches, source = pass_batches(model, config, ctx)
        trained, report = distill(model, ctx.teacher, batches, config)
        metrics: dict[str, JsonValue] = {
            "steps": len(report.losses),
            "first_loss": report.first_loss,
            "last_loss": report.last_loss,
            "seconds": report.seconds,
        }
        return TorchPassOutput(trained, {"loss": config.loss, "data": source}, metrics)
