"""Slimming attention models: remove whole attention heads and feed-forward neurons, ranked by importance.

:func:`slim_attention` works on a copy of the model. It finds the sites (:mod:`slim_sites`), scores every
unit (:mod:`slim_importance`), keeps the best ``1 - heads`` of each site's heads and ``1 - amount`` of its
feed-forward neurons, and rebuilds the layers with only those. Text models score on token batches: the
caller's, or tokenized :mod:`text_corpus` paragraphs (no download) with the model's own tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slipstream.errors import ConfigError, DataError
from slipstream.passes.torch_model import TorchData, TorchModel

if TYPE_CHECKING:
    from slipstream.passes.slim_importance import Importance

Batch = tuple[Any, ...]
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class SlimSettings:
    """What :func:`slim_attention` removes and how it ranks (prune.structured's config, narrowed)."""

    heads: float  # fraction of heads removed per attention site
    ffn: float  # fraction of feed-forward neurons removed per site (BERT-family layers)
    importance: Importance = "l2"
    scope: Literal["layer", "global"] = "layer"
    round_to: int | None = None  # feed-forward widths become a multiple of this
    ignore: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class SlimReport:
    heads_before: int = 0
    heads_after: int = 0
    ffn_before: int = 0
    ffn_after: int = 0
    params_before: int = 0
    params_after: int = 0
    pruned_sites: int = 0
    kept: dict[str, list[int]] = field(default_factory=dict)  # site name → kept unit indices


def _params(module: Any) -> int:
    return sum(int(p.numel()) for p in module.parameters())


def slim_attention(
    model: TorchModel, settings: SlimSettings, batches: Sequence[Batch] | None = None
) -> tuple[TorchModel, SlimReport]:
    """A copy of ``model`` with fewer heads and feed-forward neurons; ``model`` is not changed."""
    from slipstream.passes.slim_importance import DATA_IMPORTANCE, choose_keep, scores
    from slipstream.passes.slim_sites import find_sites

    if settings.importance in DATA_IMPORTANCE and batches is None:
        raise ConfigError(
            f"prune.structured with importance '{settings.importance}' scores heads and neurons on data; none "
            "was given.",
            field="importance",
            hint="Give token batches (or training data), or use importance l1, l2 or random.",
        )
    out = model.copy()
    module = out.module
    report = SlimReport(params_before=_params(module))
    sites = find_sites(module, settings.ignore)
    amounts = [settings.heads if s.kind == "heads" else settings.ffn for s in sites]
    picked = [(s, a) for s, a in zip(sites, amounts, strict=True) if a > 0]
    site_scores = scores(module, [s for s, _ in picked], settings.importance, batches, settings.seed)
    keeps = choose_keep(
        site_scores, [a for _, a in picked], scope=settings.scope,
        round_to=[settings.round_to if s.kind == "ffn" else None for s, _ in picked],
        kinds=[s.kind for s, _ in picked],
    )  # fmt: skip
    chosen = {s.name: k for (s, _), k in zip(picked, keeps, strict=True)}
    for site in sites:
        before = site.units
        keep = chosen.get(site.name, list(range(before)))
        if len(keep) < before:
            site.prune(keep)
            report.pruned_sites += 1
        report.kept[site.name] = keep
        if site.kind == "heads":
            report.heads_before += before
            report.heads_after += len(keep)
        else:
            report.ffn_before += before
            report.ffn_after += len(keep)
    module.eval()
    report.params_after = _params(module)
    return out, report


def data_batches(data: TorchData, batch_size: int, limit: int) -> list[Batch]:
    """Up to ``limit`` rows of a single-input model's training data, as one-tensor batches."""
    import torch

    x = data.inputs[:limit]
    return [(torch.from_numpy(x[i : i + batch_size]),) for i in range(0, len(x), batch_size)]


def tokenizer_path(module: Any, given: str | None) -> str:
    """The tokenizer's directory: ``given``, else the local folder the transformers model was loaded from."""
    if given is not None:
        return given
    for sub in module.modules():
        path = getattr(getattr(sub, "config", None), "_name_or_path", "")
        if path and Path(str(path)).is_dir():
            return str(path)
    raise ConfigError(
        "prune.structured scores a text model's heads on tokenized text, but the model does not say which "
        "tokenizer it uses (its config names no local folder) and none was given.",
        field="tokenizer",
        hint="Set tokenizer: PATH (a folder with the tokenizer files, e.g. the model's save_pretrained folder), "
        "or use importance l1, l2 or random, which need no data.",
    )


def text_batches(
    tokenizer_dir: str, texts: Sequence[str], *, inputs: int, batch_size: int, seq_len: int
) -> list[Batch]:
    """``texts`` tokenized in batches: tuples of the first ``inputs`` of input_ids, attention_mask, token_type_ids."""
    import torch
    from transformers import AutoTokenizer

    if not texts:
        raise DataError(
            "Expected unlabeled text to tokenize; got none (no installed package ships a README with prose).",
            source="text_corpus",
            hint="Give training data instead, or install the packages whose documentation is the corpus.",
        )
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"Expected a tokenizer in '{tokenizer_dir}' (tokenizer.json or vocab files); it could not be loaded: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            field="tokenizer",
            hint="Point tokenizer at the folder the model was saved to with its tokenizer (save_pretrained).",
        ) from exc
    out: list[Batch] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i : i + batch_size]), padding="longest", truncation=True, max_length=seq_len,
                  return_tensors="pt")  # fmt: skip
        if "token_type_ids" not in enc:
            enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
        out.append(tuple(enc[name].to(torch.int64) for name in TOKEN_INPUTS[:inputs]))
    return out
