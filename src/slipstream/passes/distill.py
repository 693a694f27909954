"""train.distill: recovery by distillation, training a slimmed model to reproduce its original, with no labels.

The loss has up to three terms, each with its weight:

- ``output``: the distance between what student and teacher return (a sentence embedding,
  ``last_hidden_state`` or logits): their mean squared error or one minus their cosine along the last axis.
- ``layers``: for a transformers (BERT-family) encoder, every encoder layer's hidden states, matched layer by
  layer: the squared error over real (unpadded) tokens, each dimension divided by the teacher's variance of
  it (so that neither a few outlier dimensions nor one layer's scale dominates). Slimming heads and
  feed-forward neurons keeps the hidden size, so the layers line up one to one.
- ``embedding``: one minus the cosine of the sentence embeddings, the last hidden states mean-pooled over the
  attention mask (what sentence-transformers computes).

``layer_weight`` and ``embedding_weight`` default to 1 on a transformers encoder and 0 elsewhere; setting
both to 0 gives output-only distillation. The teacher runs once per batch (its outputs are kept, up to
:data:`CACHE_BYTES`), the student trains with Adam, an optional linear warm-up, a cosine learning-rate decay
and gradient clipping; batches come round again in a new seeded order each epoch, so a run is deterministic
under its seed.

As a pass, the teacher is the model before the recipe's torch passes. A single-input model trains on the
inputs of the training data (its labels are not read); a text model on unlabeled text of installed packages
(:mod:`text_corpus`), cut into sentences or paragraphs, tokenized by its own tokenizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from pydantic import Field, JsonValue, model_validator

from slipstream.errors import ConfigError
from slipstream.passes.base import PassConfig
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_base import TorchContext, TorchPass, TorchPassOutput
from slipstream.passes.torch_model import TorchModel, require_torch

Batch = tuple[Any, ...]
Progress = Callable[[int, float], None]  # (step, loss)
CACHE_BYTES = 256 << 20  # the teacher's outputs kept across epochs, at most; beyond it, the teacher runs again


class DistillConfig(PassConfig):
    steps: int = Field(default=300, ge=1, description="Optimizer steps (batches) to train for.")
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate (Adam), decayed by a cosine to 0.")
    warmup: float = Field(
        default=0.0, ge=0, lt=1, description="Fraction of the steps over which the learning rate rises from 0."
    )
    loss: Literal["mse", "cosine"] = Field(
        default="mse", description="Distance to the teacher's outputs: mean squared error, or 1 - cosine."
    )
    output_weight: float = Field(default=1.0, ge=0, description="Weight of the output term (its distance: loss).")
    layer_weight: float | None = Field(
        default=None,
        ge=0,
        description="Weight of matching every encoder layer's hidden states (normalized MSE over real tokens); "
        "None: 1 on a transformers encoder, 0 elsewhere.",
    )
    embedding_weight: float | None = Field(
        default=None,
        ge=0,
        description="Weight of 1 - cosine of the mean-pooled sentence embeddings (last hidden states over the "
        "attention mask); None: 1 on a transformers encoder, 0 elsewhere.",
    )
    clip_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the gradient norm; None: off.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay (AdamW).")
    dropout: bool = Field(
        default=False, description="Train with the model's dropout on; off matches the teacher more closely."
    )
    seed: int = Field(default=0, description="Seed for the batch order.")
    batch_size: int = Field(default=32, ge=1, description="Rows (or texts) per step.")
    texts: int = Field(default=4000, ge=1, description="Texts of the unlabeled corpus, for a text model.")
    chunks: Literal["sentences", "paragraphs"] = Field(
        default="sentences", description="How the unlabeled corpus is cut into texts, for a text model."
    )
    seq_len: int = Field(default=64, ge=2, description="Tokens per text at most, for a text model.")
    tokenizer: str | None = Field(
        default=None,
        description="Folder of a text model's tokenizer; None: the folder the transformers model was loaded from.",
    )

    @model_validator(mode="after")
    def _some_term(self) -> Self:
        if self.output_weight == 0 and self.layer_weight == 0 and self.embedding_weight == 0:
            raise ValueError(
                "output_weight, layer_weight and embedding_weight are all 0: nothing to train toward; "
                "give at least one a positive weight"
            )
        return self


@dataclass(frozen=True)
class Weights:
    """The loss terms' weights, resolved for one model."""

    output: float
    layers: float
    embedding: float


@dataclass
class DistillReport:
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0
    weights: Weights | None = None

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


def encoder_layers(module: Any) -> list[Any]:
    """The BERT-family encoder layers of ``module``, in order (empty for any other model)."""
    from slipstream.passes.slim_sites import is_bert_layer

    return [m for m in module.modules() if is_bert_layer(m)]


def resolve_weights(config: DistillConfig, student: Any, teacher: Any) -> Weights:
    """The weights for this pair of models; a layer term on models without matching layers is refused."""
    layers = len(encoder_layers(student))
    auto = 1.0 if layers else 0.0
    weights = Weights(
        config.output_weight,
        auto if config.layer_weight is None else config.layer_weight,
        auto if config.embedding_weight is None else config.embedding_weight,
    )
    if (weights.layers > 0 or weights.embedding > 0) and (layers == 0 or layers != len(encoder_layers(teacher))):
        raise ConfigError(
            f"Expected a transformers (BERT-family) encoder with as many layers as its teacher for layer_weight "
            f"or embedding_weight > 0; the student has {layers} encoder layers, the teacher "
            f"{len(encoder_layers(teacher))}.",
            field="layer_weight",
            hint="Set layer_weight: 0 and embedding_weight: 0 (output-only distillation) for this model.",
        )
    if weights.output == weights.layers == weights.embedding == 0:
        raise ConfigError(
            "Expected a positive weight for at least one distillation term; every term resolved to 0 for this "
            "model (it has no encoder layers).",
            field="output_weight",
            hint="Set output_weight > 0.",
        )
    return weights


class Taps:
    """Forward hooks that record every encoder layer's hidden states while the model runs."""

    def __init__(self, module: Any) -> None:
        self.states: list[Any] = []
        self._handles = [layer.register_forward_hook(self._record) for layer in encoder_layers(module)]

    def _record(self, _mod: Any, _inp: Any, out: Any) -> None:
        self.states.append(out[0] if isinstance(out, tuple) else out)

    def run(self, module: Any, batch: Batch) -> tuple[Any, list[Any]]:
        """``module``'s main output and its layers' hidden states on ``batch``."""
        from slipstream.passes.slim_importance import main_output

        self.states = []
        return main_output(module(*batch)), self.states

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def token_mask(batch: Batch, states: Any) -> Any:
    """[batch, tokens, 1] float weights of the real tokens: the attention mask (a text model's second input)."""
    import torch

    if len(batch) > 1 and isinstance(batch[1], torch.Tensor) and batch[1].shape == states.shape[:2]:
        return batch[1].to(states.dtype).unsqueeze(-1)
    return torch.ones((*states.shape[:2], 1), dtype=states.dtype)


def layer_loss(student: Sequence[Any], teacher: Sequence[Any], mask: Any) -> Any:
    """Mean over layers of the masked squared error of hidden states, each dimension divided by the teacher's
    variance of it over the batch's real tokens: a few outlier dimensions of large scale (BERT's hidden states
    have them) would otherwise outweigh all the others."""
    total = 0
    tokens = mask.sum().clamp(min=1)
    for s, t in zip(student, teacher, strict=True):
        mean = (t * mask).sum(dim=(0, 1)) / tokens
        var = (((t - mean) ** 2) * mask).sum(dim=(0, 1)) / tokens
        total = total + ((((s - t) ** 2) * mask).sum(dim=(0, 1)) / var.clamp(min=1e-6)).sum() / (tokens * len(var))
    return total / len(student)


def pooled(states: Any, mask: Any) -> Any:
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def objective(
    weights: Weights, loss: Literal["mse", "cosine"], batch: Batch, student: tuple[Any, list[Any]],
    teacher: tuple[Any, list[Any]],
) -> Any:  # fmt: skip
    """The weighted distillation loss of one batch: (main output, layer states) of the student and teacher."""
    import torch.nn.functional as F  # noqa: N812

    total = weights.output * distance(student[0], teacher[0], loss) if weights.output > 0 else 0
    if weights.layers > 0 or weights.embedding > 0:
        mask = token_mask(batch, teacher[1][-1])
        if weights.layers > 0:
            total = total + weights.layers * layer_loss(student[1], teacher[1], mask)
        if weights.embedding > 0:
            cos = F.cosine_similarity(pooled(student[1][-1], mask), pooled(teacher[1][-1], mask), dim=-1)
            total = total + weights.embedding * (1 - cos).mean()
    return total


def _schedule(config: DistillConfig) -> Callable[[int], float]:
    warm = int(config.warmup * config.steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(config.steps - warm, 1)))

    return factor


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

    if not batches:
        raise ValueError("distill needs at least one batch")  # callers build the batches
    torch.manual_seed(config.seed)
    out = model.copy()
    student = out.module
    weights = resolve_weights(config, student, teacher)
    with_layers = weights.layers > 0 or weights.embedding > 0
    was_training = teacher.training
    teacher.eval()
    targets: dict[int, tuple[Any, list[Any]]] = {}
    cached = 0
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config))
    report = DistillReport(weights=weights)
    started = time.perf_counter()
    order: list[int] = []
    epoch = 0
    taps = (Taps(teacher), Taps(student)) if with_layers else None
    student.train(config.dropout)
    try:
        for step in range(config.steps):
            if not order:
                g = torch.Generator().manual_seed(config.seed + epoch)
                order = torch.randperm(len(batches), generator=g).tolist()
                epoch += 1
            index = order.pop()
            batch = batches[index]
            target = targets.get(index)
            if target is None:
                with torch.no_grad():
                    target = _run(taps[0] if taps else None, teacher, batch)
                size = sum(int(t.numel()) * t.element_size() for t in (target[0], *target[1]))
                if cached + size <= CACHE_BYTES:
                    targets[index], cached = target, cached + size
            opt.zero_grad()
            loss = objective(weights, config.loss, batch, _run(taps[1] if taps else None, student, batch), target)
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            opt.step()
            sched.step()
            report.losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, report.losses[-1])
    finally:
        if taps:
            taps[0].close()
            taps[1].close()
        teacher.train(was_training)
        student.eval()
    report.seconds = time.perf_counter() - started
    return out, report


def _run(taps: Taps | None, module: Any, batch: Batch) -> tuple[Any, list[Any]]:
    from slipstream.passes.slim_importance import main_output

    if taps is None:
        return main_output(module(*batch)), []
    return taps.run(module, batch)


def gap(model: Any, teacher: Any, batches: Sequence[Batch], loss: Literal["mse", "cosine"] = "mse") -> float:
    """The mean distance between ``model``'s and ``teacher``'s outputs over ``batches`` (both in eval mode)."""
    import torch

    from slipstream.passes.slim_importance import main_output

    model.eval()
    teacher.eval()
    with torch.no_grad():
        values = [float(distance(main_output(model(*b)), main_output(teacher(*b)), loss)) for b in batches]
    return sum(values) / len(values)


def hidden_gap(model: Any, teacher: Any, batches: Sequence[Batch]) -> float:
    """The mean normalized hidden-state gap (the ``layers`` term) over ``batches``, for two encoders."""
    import torch

    taps = Taps(model), Taps(teacher)
    model.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            values = []
            for b in batches:
                (_, s), (_, t) = taps[0].run(model, b), taps[1].run(teacher, b)
                values.append(float(layer_loss(s, t, token_mask(b, t[-1]))))
    finally:
        taps[0].close()
        taps[1].close()
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
        # In order of length, so that a batch pads little (the batch order is shuffled when training).
        texts = sorted(unlabeled_text(config.texts, chunks=config.chunks), key=len)
        path = tokenizer_path(model.module, config.tokenizer)
        batches = text_batches(path, texts, inputs=len(model.example_inputs), batch_size=config.batch_size,
                               seq_len=config.seq_len)  # fmt: skip
        where = "installed packages' READMEs and docstrings"
        return batches, f"{len(texts)} {config.chunks} of {where}, tokenized by {path}"
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
        weights = report.weights
        resolved: dict[str, JsonValue] = {"loss": config.loss, "data": source}
        if weights is not None:
            resolved["weights"] = {"output": weights.output, "layers": weights.layers, "embedding": weights.embedding}
        return TorchPassOutput(trained, resolved, metrics)
