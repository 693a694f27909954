"""Builds from a PyTorch source: the module itself, its eager speed, and the pruning candidates.

When the recipe's model is a torch source and training data is given, the `auto` ladder also tries
structured pruning with recovery fine-tuning (alone and followed by static int8). Those candidates run
torch passes, so they are cached by the build itself: the key is the baseline model, the pass chain and
the training and evaluation data; a second build re-uses the verified bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.build.recipe import Candidate, Recipe
from slipstream.build.record import SourceTiming
from slipstream.data.datasets import Dataset, arrays_digest, load_dataset
from slipstream.data.synthetic import example_inputs
from slipstream.errors import ConfigError, SlipstreamError
from slipstream.evaluate.bench import BenchSettings
from slipstream.evaluate.torch_eager import time_torch_eager


@dataclass(frozen=True)
class TorchSourceContext:
    model: Any  # slipstream.passes.torch_model.TorchModel
    train: Any  # TorchData | None
    eval: Any  # TorchData
    data_key: str


def _torch_data(dataset: Dataset, what: str) -> Any:
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
    from slipstream.passes.torch_model import TorchModel

    if module is None:
        module = load_torch_module(recipe.model)
    example = example_inputs(baseline.manifest.inputs, 1)
    model = TorchModel(module, tuple(torch.from_numpy(v) for v in example.values()))
    train = None
    if recipe.data.train is not None:
        train = _torch_data(load_dataset(recipe.data.train, baseline.manifest.inputs), str(recipe.data.train))
    evaluation = _torch_data(dataset, str(recipe.data.eval))
    key = sha256_json(
        [
            baseline.model_sha256,
            arrays_digest({"x": train.inputs, "y": train.targets}) if train is not None else None,
            arrays_digest({"x": evaluation.inputs, "y": evaluation.targets}),
        ]
    )
    return TorchSourceContext(model=model, train=train, eval=evaluation, data_key=key)


def torch_eager_timing(ctx: TorchSourceContext, feeds: dict[str, np.ndarray], recipe: Recipe) -> SourceTiming:
    budget = recipe.bench_time_s
    settings = BenchSettings(batch_sizes=(recipe.batch_size,), warmup_runs=3, min_time_s=budget / 4, max_time_s=budget)
    result = time_torch_eager(ctx.model.module, feeds, settings)
    return SourceTiming(
        framework="torch eager (fp32)",
        latency_p50_ms=result.p50_ms,
        latency_p99_ms=result.p99_ms,
        throughput_sps=result.throughput_sps,
    )


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
    ctx: TorchSourceContext, cand: Candidate, refs: list[Any], dest: Path, recipe: Recipe, cache_file: Path
) -> tuple[Bundle, bool]:
    """The candidate's bundle, re-used from an earlier build when nothing it depends on changed."""
    from slipstream.passes.torch_recipe import optimize_torch

    key = sha256_json([ctx.data_key, [str(r) for r in refs], recipe.seed])
    index: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if index.get(cand.name) == key and dest.is_dir():
        try:
            return Bundle.load(dest), True
        except SlipstreamError:
            pass  # damaged or changed: rebuild it
    bundle = optimize_torch(
        ctx.model, refs, dest, name=recipe.name, train=ctx.train, eval_data=ctx.eval, overwrite=True, seed=recipe.seed
    )
    index[cand.name] = key
    cache_file.write_text(json.dumps(index))
    return bundle, False
