"""Slimming a transformers text encoder in a build: what the recipe may set, and what the source must be.

A torch source whose inputs are token tensors (``input_ids``, then ``attention_mask``, then
``token_type_ids``, as the forward() takes them) and which holds BERT-family encoder layers (BERT, MiniLM,
RoBERTa...) is a *text encoder*. With a label-free metric (cosine, agreement), the ``auto`` ladder slims it:
``prune.structured`` removes attention heads and feed-forward neurons, ``train.distill`` trains the slimmed
model toward the unpruned one on unlabeled text of installed packages (no labels, no download), tokenized
by the model's own tokenizer, then it is exported, alone and followed by dynamic int8. The ``slim`` field of
a recipe sets the amounts and the training length; the defaults keep a build usable on two cores.
:func:`training_steps` puts into the run record what each candidate's torch steps did, in words and numbers.

Nothing here imports torch or transformers at module level: the recipe schema imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from slipstream.errors import ConfigError

if TYPE_CHECKING:
    from slipstream.artifact.bundle import Bundle
    from slipstream.build.record import TrainingStep

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the order slim_attention.text_batches feeds


class SlimLadderConfig(BaseModel):
    """The recipe's ``slim`` field: the slim candidates the ``auto`` ladder adds for a text encoder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="Add the slim candidates for a transformers text encoder source.")
    amounts: tuple[Annotated[float, Field(gt=0, lt=1)], ...] = Field(
        default=(0.25, 0.5),
        min_length=1,
        description="Fractions of attention heads and feed-forward neurons removed per layer; one slim "
        "candidate (and its int8 variant) per amount.",
    )
    importance: Literal["taylor", "output_norm", "l2", "l1", "random"] = Field(
        default="taylor", description="How heads and neurons are ranked (taylor/output_norm score on unlabeled text)."
    )
    score_texts: int = Field(default=64, ge=1, description="Texts scored for 'taylor' or 'output_norm'.")
    distill_steps: int = Field(
        default=100, ge=1, description="Distillation steps (batches) per slim candidate: the training length."
    )
    distill_lr: float | None = Field(
        default=None, gt=0, description="Peak distillation learning rate; None: the pass's default."
    )
    texts: int | None = Field(
        default=None, ge=1, description="Unlabeled texts to distill on; None: distill_steps × batch_size (each once)."
    )
    batch_size: int = Field(default=32, ge=1, description="Texts per distillation step.")
    seq_len: int = Field(default=32, ge=2, description="Tokens per text, for scoring and distillation.")
    tokenizer: str | None = Field(
        default=None,
        description="Folder of the model's tokenizer; None: the folder the transformers model was loaded from.",
    )
    int8: bool = Field(default=True, description="Also try each slim candidate followed by dynamic int8.")

    @property
    def distill_texts(self) -> int:
        return self.texts if self.texts is not None else self.distill_steps * self.batch_size


@dataclass(frozen=True)
class TextEncoder:
    """A torch source recognised as a text encoder: its token inputs and its tokenizer (or why there is none)."""

    inputs: tuple[str, ...]
    tokenizer: str | None  # a folder that loads with AutoTokenizer, offline
    no_tokenizer: str | None = None  # why there is no tokenizer, when there is none

    @property
    def training(self) -> str:
        return "train.distill toward the unpruned model on unlabeled text (labels are not used)"


def has_token_inputs(names: tuple[str, ...]) -> bool:
    """Inputs named and ordered as a tokenizer gives them: input_ids, then attention_mask, then token_type_ids."""
    return 0 < len(names) <= len(TOKEN_INPUTS) and names == TOKEN_INPUTS[: len(names)]


def not_a_text_encoder(names: tuple[str, ...], *, has_layers: bool | None) -> ConfigError:
    """The error for torch passes on a multi-input torch source that a build cannot feed."""
    found = f"inputs {list(names)}"
    if has_token_inputs(names) and has_layers is False:
        found += " but no BERT-family encoder layer (attention.self query/key/value, intermediate, output)"
    return ConfigError(
        "Torch passes in a build take a single-input model or a transformers text encoder (inputs "
        f"{', '.join(TOKEN_INPUTS[:2])}[, {TOKEN_INPUTS[2]}] in that order, with BERT-family layers); the "
        f"source has {found}.",
        field="candidates",
        hint="Use ONNX candidates for this model (quantize.*, graph.optimize, engine.openvino), or run the torch "
        "passes in code with slipstream.passes.torch_recipe.run_torch_recipe and your own data.",
    )


def find_tokenizer(module: Any, given: str | None) -> tuple[str | None, str | None]:
    """(the tokenizer folder, None), or (None, why not): ``given``, else the folder the model was loaded from.

    The tokenizer must load offline and its vocabulary must fit the model's token embeddings."""
    from slipstream.passes.slim_attention import tokenizer_path

    try:
        path = tokenizer_path(module, given)
    except ConfigError:  # only when none is given: a given folder is checked below
        return None, (
            "no tokenizer found: the model's config names no local folder with one, and the recipe sets none. "
            "Set slim.tokenizer: PATH (a folder with tokenizer.json or vocab files, as save_pretrained writes it)."
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, (
            f"no tokenizer found: expected one in '{path}' (tokenizer.json or vocab files); it could not be loaded "
            f"({first}). Set slim.tokenizer: PATH to the folder the model was saved to with its tokenizer."
        )
    vocab = _vocab_size(module)
    if vocab is not None and len(tok) > vocab:
        return None, (
            f"the tokenizer in '{path}' has {len(tok)} tokens but the model embeds only {vocab}: it belongs to "
            "another model. Set slim.tokenizer: PATH to this model's tokenizer."
        )
    return path, None


def _vocab_size(module: Any) -> int | None:
    for sub in module.modules():
        size = getattr(getattr(sub, "config", None), "vocab_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


def _num(value: JsonValue, fmt: str = "{:,}") -> str:
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else "?"


def _summary(name: str, metrics: dict[str, JsonValue], resolved: dict[str, JsonValue]) -> str:
    if name == "prune.structured":
        parts = []
        if "heads_before" in metrics:
            parts.append(f"attention heads {_num(metrics['heads_before'])} → {_num(metrics.get('heads_after'))}")
        if "ffn_before" in metrics:
            parts.append(f"feed-forward neurons {_num(metrics['ffn_before'])} → {_num(metrics.get('ffn_after'))}")
        parts.append(f"parameters {_num(metrics.get('params_before'))} → {_num(metrics.get('params_after'))}")
        parts.append(f"{_num(metrics.get('macs_ratio'), '{:.2f}')}× fewer MACs")
        return "slimmed: " + ", ".join(parts)
    if name == "train.distill":
        loss = resolved.get("loss", "loss")
        return (
            f"distilled {_num(metrics.get('steps'))} steps from the unpruned model ({loss} "
            f"{_num(metrics.get('first_loss'), '{:.3g}')} → {_num(metrics.get('last_loss'), '{:.3g}')}, "
            f"{_num(metrics.get('seconds'), '{:.0f}')} s) on {resolved.get('data', 'its data')}"
        )
    shown = ", ".join(f"{k} {_num(v, '{:.4g}') if isinstance(v, float) else v}" for k, v in metrics.items())
    return f"{name}: {shown}" if shown else name


def training_steps(bundle: Bundle) -> tuple[TrainingStep, ...]:
    """The torch steps in ``bundle``'s lineage, with what each measured, summed up in words for the report."""
    from slipstream.build.record import TrainingStep
    from slipstream.passes.catalogue import CATALOGUE

    out: list[TrainingStep] = []
    manifest = bundle.manifest
    for entry in manifest.lineage:
        name = entry.step.partition("@")[0]
        spec = CATALOGUE.get(name)
        if spec is None or spec.input_kind != "torch" or spec.output_kind != "torch":
            continue
        metrics = manifest.metrics.get(entry.step)
        resolved = manifest.resolved.get(entry.step)
        m = dict(metrics) if isinstance(metrics, dict) else {}
        r = dict(resolved) if isinstance(resolved, dict) else {}
        out.append(TrainingStep(step=entry.step, summary=_summary(name, m, r), metrics=m))
    return tuple(out)
