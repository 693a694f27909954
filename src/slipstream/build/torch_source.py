"""Builds from a PyTorch source: the module itself, its eager speed, and the pruning and slimming candidates.

When the recipe's model is a torch source and training data is given, the `auto` ladder also tries
structured pruning with recovery fine-tuning (alone and followed by static int8). When the source is a
transformers text encoder (token inputs, BERT-family layers; see :mod:`text_slim`) and the metric needs no
labels, it tries slimming instead: heads and feed-forward neurons removed, recovered by distillation from
the unpruned model on unlabeled text (alone and followed by dynamic int8). Those candidates run through the
pass runner like any recipe: their exported bundles sit in the pass cache under the chained fingerprints of
the source and every torch step, so a second build re-uses them without training.

A bundle given as the recipe's model holds no torch module, and a multi-input model that is not a text
encoder cannot be fed by the build: a candidate with torch passes then fails with :func:`torch_refusal`'s
error, which says what to give instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.build.measure import first_rows
from slipstream.build.recipe import Candidate, Recipe
from slipstream.build.text_slim import TextEncoder, find_tokenizer, has_token_inputs, not_a_text_encoder
from slipstream.data.datasets import LABELS, Dataset, arrays_digest, load_dataset
from slipstream.data.synthetic import example_inputs
from slipstream.errors import ConfigError
from slipstream.evaluate.sidebyside import SideBySide
from slipstream.evaluate.torch_eager import torch_side_by_side
from slipstream.runtime.base import EngineBase

if TYPE_CHECKING:
    from slipstream.passes.torch_model import TorchData, TorchModel


@dataclass(frozen=True)
class TorchSourceContext:
    """The torch module behind a build's source (loaded once per build), with its labeled data."""

    model: TorchModel
    train: TorchData | None
    eval: TorchData | None  # None: the evaluation data has no labels
    data_key: str  # the baseline and the data: part of the key of the torch eager timing
    no_train: str | None = None  # why there is no labeled training data, when there is none
    text: TextEncoder | None = None  # set when the source is a transformers text encoder


def _torch_data(dataset: Dataset, what: str) -> TorchData:
    from slipstream.passes.torch_model import TorchData

    if len(dataset.inputs) != 1:
        raise ConfigError(
            f"Torch passes in a build take single-input models; {what} has inputs {sorted(dataset.inputs)}.",
            field="data",
        )
    if dataset.labels is None:
        raise ConfigError(f"{what} needs labels for fine-tuning.", field="data.train")
    return TorchData(next(iter(dataset.inputs.values())), np.asarray(dataset.labels))


def _text_encoder(module: Any, names: tuple[str, ...], tokenizer: str | None) -> TextEncoder | None:
    """The source as a text encoder (token inputs and BERT-family layers), else None."""
    from slipstream.passes.slim_sites import is_bert_layer

    if not has_token_inputs(names) or not any(is_bert_layer(m) for m in module.modules()):
        return None
    path, why = find_tokenizer(module, tokenizer)
    return TextEncoder(inputs=names, tokenizer=path, no_tokenizer=why)


def is_model_dir(location: str) -> bool:
    """A transformers ``save_pretrained`` folder (config.json and weights), which the build converts itself."""
    from slipstream.importers.transformers_dir import looks_like_model_dir

    path = Path(location)
    return looks_like_model_dir(path) and not (path / "manifest.json").is_file()


def is_bundle_dir(location: str) -> bool:
    """A folder that the build loads as a bundle as it is (any folder but a transformers model folder)."""
    return Path(location).is_dir() and not is_model_dir(location)


def load_source_module(location: str) -> Any:
    """The torch module of a build's source, loaded once per build: an entry point's ``FILE.py:FACTORY``, or a
    transformers model directory's (offline); None for other sources (files are loaded where they are read)."""
    from slipstream.importers.torch_sources import is_entry_point, load_torch_module
    from slipstream.importers.transformers_dir import infer_task, load_model_dir

    path = Path(location)
    if is_model_dir(location):
        return load_model_dir(path, infer_task(path))
    if path.exists() or not is_entry_point(location):
        return None
    return load_torch_module(location)


def torch_context(recipe: Recipe, baseline: Bundle, dataset: Dataset, module: Any = None) -> TorchSourceContext | None:
    """The torch module behind a torch-sourced baseline (``module`` when already loaded), with its data;
    None for other sources, for a bundle given as the model (it holds no torch module), and for a
    multi-input model that is not a text encoder (:func:`torch_refusal` says why, when a candidate needs it)."""
    names = tuple(s.name for s in baseline.manifest.inputs)
    if baseline.manifest.source.framework != "torch" or is_bundle_dir(recipe.model):
        return None
    if len(names) != 1 and not has_token_inputs(names):
        return None
    import torch

    from slipstream.importers.torch_sources import load_torch_module
    from slipstream.passes.export import source_model
    from slipstream.passes.torch_model import TorchModel

    if module is None:
        module = load_source_module(recipe.model)
    if module is None:  # a model file (.pt, .pt2)
        module = load_torch_module(recipe.model)
    text = _text_encoder(module, names, recipe.slim.tokenizer)
    single = len(names) == 1
    if not single and text is None:
        return None
    # A text encoder traces on real token rows (ids within its vocabulary); others on generated inputs.
    example = first_rows(dataset, 2) if text is not None else example_inputs(baseline.manifest.inputs, 1)
    # Cached results of its torch passes are keyed by the weights and the code file they came from.
    source = source_model(recipe.model, module)
    fingerprint = source.sha256 if source is not None else None
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in example.values())
    model = TorchModel(module, tensors, fingerprint=fingerprint)
    # Fine-tuning needs labels; a build with a label-free metric runs without them (fine-tuning is then skipped).
    train = None
    no_train: str | None = "data.train is not given"
    if not single:
        no_train = "this text encoder has several inputs: it recovers by train.distill on unlabeled text instead"
    elif recipe.data.train is not None:
        loaded = load_dataset(recipe.data.train, baseline.manifest.inputs)
        train = _torch_data(loaded, str(recipe.data.train)) if loaded.labels is not None else None
        no_train = None if train is not None else f"data.train '{recipe.data.train}' has no '{LABELS}'"
    evaluation = _torch_data(dataset, str(recipe.data.eval)) if single and dataset.labels is not None else None
    key = sha256_json(
        [
            baseline.model_sha256,
            arrays_digest({"x": train.inputs, "y": train.targets}) if train is not None else None,
            arrays_digest({"x": evaluation.inputs, "y": evaluation.targets}) if evaluation is not None else None,
        ]
    )
    return TorchSourceContext(model=model, train=train, eval=evaluation, data_key=key, no_train=no_train, text=text)


def torch_refusal(cand: Candidate, recipe: Recipe, baseline: Bundle) -> ConfigError:
    """Why ``cand``'s torch passes cannot run on this build's source (torch_context gave None)."""
    source = baseline.manifest.source
    names = tuple(s.name for s in baseline.manifest.inputs)
    if source.framework != "torch":
        return ConfigError(
            f"Candidate '{cand.name}' starts with a torch pass, but the source is a {source.framework} model; "
            "torch passes need a PyTorch source.",
            field="candidates",
            hint="Give the PyTorch model (FILE.py:FACTORY) as the recipe's model, or use ONNX passes only.",
        )
    if is_bundle_dir(recipe.model):
        origin = f" ({source.path})" if source.path else ""
        return ConfigError(
            f"Candidate '{cand.name}' starts with a torch pass, but the recipe's model '{recipe.model}' is a bundle "
            f"(ONNX): torch passes need the torch module it was converted from{origin}, which a bundle does not hold.",
            field="model",
            hint="Set model: to the torch source itself (an entry point FILE.py:FACTORY, with the input_shape or "
            "dynamic_axes that convert took, or a transformers save_pretrained folder); the build converts it and "
            "caches the conversion. Or keep the bundle and use ONNX candidates only.",
        )
    return not_a_text_encoder(names, has_layers=False if has_token_inputs(names) else None)


DATA_IMPORTANCE = ("taylor", "output_norm")  # importances that score units on data (here: tokenized text)


def _names(cand: Candidate) -> list[tuple[str, dict[str, Any]]]:
    from slipstream.passes.recipe import parse_pass_ref

    out: list[tuple[str, dict[str, Any]]] = []
    for p in cand.passes:
        if isinstance(p, str):
            name, options = parse_pass_ref(p)
            out.append((name, dict(options)))
        else:
            ((name, options),) = p.items()
            out.append((name, dict(options or {})))
    return out


def skip_reason(cand: Candidate, ctx: TorchSourceContext | None) -> str | None:
    """Why ``cand`` is skipped (None: it can run): it fine-tunes and the build has no labeled training data,
    or it needs a text encoder's tokenizer (distillation, or heads scored on text) and none was found."""
    from slipstream.passes.distill import Distill
    from slipstream.passes.finetune import Finetune
    from slipstream.passes.prune_structured import PruneStructured

    if ctx is None:
        return None
    steps = _names(cand)
    if ctx.train is None and any(name == Finetune.name for name, _ in steps):
        return (
            f"skipped: {Finetune.name} needs labeled training data and {ctx.no_train}. Add a '{LABELS}' array to "
            "data.train to try it; the other candidates need no labels with a label-free metric (cosine, agreement)."
        )
    text = ctx.text
    if text is None or text.tokenizer is not None:
        return None
    needs_text = [
        name
        for name, options in steps
        if "tokenizer" not in options
        and (name == Distill.name or (name == PruneStructured.name and options.get("importance") in DATA_IMPORTANCE))
    ]
    if not needs_text:
        return None
    return f"skipped: {needs_text[0]} trains or scores on tokenized text, but {text.no_tokenizer}"


def torch_eager_timing(
    ctx: TorchSourceContext, engine: EngineBase, feeds: dict[str, np.ndarray], recipe: Recipe, name: str
) -> SideBySide:
    """torch eager against ``engine`` (the winner), interleaved, at the engine's threads, after warm-up."""
    budget = recipe.bench_time_s
    return torch_side_by_side(ctx.model.module, engine, feeds, subject=name, min_time_s=budget / 2, max_time_s=budget)


def torch_ladder(calibration: str) -> tuple[Candidate, ...]:
    finetune = {"train.finetune": {"epochs": 8, "lr": 0.002, "patience": 3}}
    int8 = {"quantize.static": {"data": calibration, "per_channel": True}}
    half = {"prune.structured": {"amount": 0.5}}
    three_quarters = {"prune.structured": {"amount": 0.75}}
    return (
        Candidate(name="pruned-50", passes=(half, finetune, "export")),
        Candidate(name="pruned-50-int8", passes=(half, finetune, "export", int8)),
        Candidate(name="pruned-75-int8", passes=(three_quarters, finetune, "export", int8)),
    )


def text_ladder(recipe: Recipe) -> tuple[Candidate, ...]:
    """Slim candidates for a text encoder: per amount in ``recipe.slim``, heads and feed-forward neurons
    pruned, distilled from the unpruned model on unlabeled text, exported, then (``int8``) dynamic int8."""
    cfg = recipe.slim
    distill: dict[str, Any] = {
        "steps": cfg.distill_steps, "texts": cfg.distill_texts, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
    }  # fmt: skip
    if cfg.distill_lr is not None:
        distill["lr"] = cfg.distill_lr
    int8 = {"quantize.dynamic": {"per_channel": True}}  # the int8 that holds MiniLM's cosine (per-tensor does not)
    out: list[Candidate] = []
    for amount in cfg.amounts:
        name = f"slim-{amount * 100:g}"
        prune = {
            "prune.structured": {
                "amount": amount, "heads": amount, "importance": cfg.importance, "text_samples": cfg.score_texts,
                "seq_len": cfg.seq_len,
            }
        }  # fmt: skip
        chain = (prune, {"train.distill": dict(distill)}, "export")
        out.append(Candidate(name=name, passes=chain))
        if cfg.int8:
            out.append(Candidate(name=f"{name}-int8", passes=(*chain, int8)))
    return tuple(out)


def source_ladder(
    ctx: TorchSourceContext | None, recipe: Recipe, calibration: str, *, label_free: bool
) -> tuple[Candidate, ...]:
    """What the ``auto`` ladder adds for a torch source: pruning with fine-tuning when there is training data,
    and, for a text encoder under a label-free metric, the slim candidates (:func:`text_ladder`)."""
    if ctx is None:
        return ()
    chosen: tuple[Candidate, ...] = ()
    if recipe.data.train is not None and len(ctx.model.example_inputs) == 1:  # without labels: recorded as skipped
        chosen = torch_ladder(calibration)
    if ctx.text is not None and label_free and recipe.slim.enabled:
        chosen = (*chosen, *text_ladder(recipe))
    return chosen


def is_torch_chain(cand: Candidate) -> bool:
    from slipstream.passes.catalogue import lookup
    from slipstream.passes.recipe import parse_pass_ref

    first = cand.passes[0]
    name = parse_pass_ref(first)[0] if isinstance(first, str) else next(iter(first))
    return lookup(name).input_kind == "torch"


def with_source_defaults(refs: list[Any], ctx: TorchSourceContext, recipe: Recipe) -> list[Any]:
    """The candidate's steps with what the build knows filled in where the recipe left it out: the recipe's
    dynamic axes on ``export`` (so a slimmed model takes any sequence length, like the baseline), and a text
    encoder's tokenizer on the passes that tokenize text."""
    tokenizer = ctx.text.tokenizer if ctx.text is not None else None
    out: list[Any] = []
    for ref in refs:
        name, options = (ref, {}) if isinstance(ref, str) else (ref[0], dict(ref[1]))
        if name == "export" and recipe.dynamic_axes and "dynamic_axes" not in options:
            options["dynamic_axes"] = list(recipe.dynamic_axes)
        if name in ("train.distill", "prune.structured") and tokenizer is not None and "tokenizer" not in options:
            options["tokenizer"] = tokenizer
        out.append((name, options) if options or not isinstance(ref, str) else ref)
    return out


def _step_text(name: str, options: dict[str, Any]) -> str:
    if name == "train.distill":
        steps = options.get("steps", "default")
        return f"training: train.distill, {steps} steps toward the unpruned model on unlabeled text"
    if name == "train.finetune":
        return f"training: train.finetune, up to {options.get('epochs', 'default')} epochs on data.train"
    if name == "prune.structured":
        return f"slimming: prune.structured, amount {options.get('amount')} ({options.get('importance', 'l2')})"
    return name


def run_torch_candidate(
    ctx: TorchSourceContext,
    refs: list[Any],
    dest: Path,
    recipe: Recipe,
    data: str | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Bundle, int]:
    """The candidate's bundle and how many of its steps the pass cache answered. The exported bundle is
    cached under the chained fingerprints of the source and every torch step (with the training data and
    seed), so an unchanged candidate is neither trained nor exported again. ``say`` hears each step as it
    starts, the torch steps only when they run (a cache hit says so instead: nothing trains)."""
    from slipstream.passes.catalogue import lookup
    from slipstream.passes.recipe import ProgressEvent
    from slipstream.passes.torch_recipe import run_torch_recipe

    steps = with_source_defaults(refs, ctx, recipe)
    named = [(r, {}) if isinstance(r, str) else r for r in steps]
    texts = [_step_text(name, options) for name, options in named]
    trains = [lookup(name).output_kind == "torch" for name, _ in named]
    cached = [False]

    def progress(event: ProgressEvent) -> None:
        if say is None or event.run is not None or event.index >= len(texts):
            return
        if not (cached[0] and trains[event.index]):  # a cache hit runs no torch step: none is announced
            say(texts[event.index])

    def heard(hit: bool) -> None:
        cached[0] = hit
        if hit and say is not None:
            say("answered by the pass cache: nothing to train")

    run = run_torch_recipe(
        ctx.model, steps, dest, name=recipe.name, train=ctx.train, eval_data=ctx.eval, overwrite=True, seed=recipe.seed,
        data=data, progress=progress, on_cache=heard,
    )  # fmt: skip
    return run.bundle, run.cache_hits
