"""Builds from a PyTorch source: the module itself, its eager speed, and the pruning candidates.

When the recipe's model is a torch source and training data is given, the `auto` ladder also tries
structured pruning with recovery fine-tuning (alone and followed by static int8). Those candidates run
through the pass runner like any recipe: their exported bundles sit in the pass cache under the chained
fingerprints of the source and every torch step, so a second build re-uses them without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.build.recipe import Candidate, Recipe
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


def torch_context(recipe: Recipe, baseline: Bundle, dataset: Dataset, module: Any = None) -> TorchSourceContext | None:
    """The torch module behind a torch-sourced baseline (``module`` when already loaded), with its data;
    None for other sources."""
    if baseline.manifest.source.framework != "torch" or len(baseline.manifest.inputs) != 1:
        return None
    import torch

    from slipstream.importers.torch_sources import load_torch_module
    from slipstream.passes.export import source_model
    from slipstream.passes.torch_model import TorchModel

    if module is None:
        module = load_torch_module(recipe.model)
    example = example_inputs(baseline.manifest.inputs, 1)
    # Cached results of its torch passes are keyed by the weights and the code file they came from.
    source = source_model(recipe.model, module)
    fingerprint = source.sha256 if source is not None else None
    model = TorchModel(module, tuple(torch.from_numpy(v) for v in example.values()), fingerprint=fingerprint)
    # Fine-tuning needs labels; a build with a label-free metric runs without them (fine-tuning is then skipped).
    train = None
    no_train: str | None = "data.train is not given"
    if recipe.data.train is not None:
        loaded = load_dataset(recipe.data.train, baseline.manifest.inputs)
        train = _torch_data(loaded, str(recipe.data.train)) if loaded.labels is not None else None
        no_train = None if train is not None else f"data.train '{recipe.data.train}' has no '{LABELS}'"
    evaluation = _torch_data(dataset, str(recipe.data.eval)) if dataset.labels is not None else None
    key = sha256_json(
        [
            baseline.model_sha256,
            arrays_digest({"x": train.inputs, "y": train.targets}) if train is not None else None,
            arrays_digest({"x": evaluation.inputs, "y": evaluation.targets}) if evaluation is not None else None,
        ]
    )
    return TorchSourceContext(model=model, train=train, eval=evaluation, data_key=key, no_train=no_train)


def missing_labels(cand: Candidate, ctx: TorchSourceContext | None) -> str | None:
    """Why ``cand`` is skipped: it fine-tunes and the build has no labeled training data (None: it can run)."""
    from slipstream.passes.finetune import Finetune
    from slipstream.passes.recipe import parse_pass_ref

    names = [parse_pass_ref(p)[0] if isinstance(p, str) else next(iter(p)) for p in cand.passes]
    if ctx is None or ctx.train is not None or Finetune.name not in names:
        return None
    return (
        f"skipped: {Finetune.name} needs labeled training data and {ctx.no_train}. Add a '{LABELS}' array to "
        "data.train to try it; the other candidates need no labels with a label-free metric (cosine, agreement)."
    )


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


def is_torch_chain(cand: Candidate) -> bool:
    from slipstream.passes.catalogue import lookup
    from slipstream.passes.recipe import parse_pass_ref

    first = cand.passes[0]
    name = parse_pass_ref(first)[0] if isinstance(first, str) else next(iter(first))
    return lookup(name).input_kind == "torch"


def run_torch_candidate(
    ctx: TorchSourceContext, refs: list[Any], dest: Path, recipe: Recipe, data: str | None = None
) -> tuple[Bundle, int]:
    """The candidate's bundle and how many of its steps the pass cache answered. The exported bundle is
    cached under the chained fingerprints of the source and every torch step (with the training data and
    seed), so an unchanged candidate is neither trained nor exported again."""
    from slipstream.passes.torch_recipe import run_torch_recipe

    run = run_torch_recipe(
        ctx.model, refs, dest, name=recipe.name, train=ctx.train, eval_data=ctx.eval, overwrite=True, seed=recipe.seed,
        data=data,
    )  # fmt: skip
    return run.bundle, run.cache_hits
