"""Per-layer sensitivity: apply a pass to one layer at a time and measure what each costs in quality.

This answers the usual complaint about quantization ("accuracy collapsed, and nobody can tell which
layer did it"): the layers at the top of the table are the ones to put in ``nodes_to_exclude``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.build.record import LayerSensitivity, SensitivityReport
from slipstream.data.datasets import Dataset
from slipstream.errors import ConfigError
from slipstream.evaluate.metrics import Metric
from slipstream.evaluate.quality import predict, score
from slipstream.runtime.engine import Engine
from slipstream.runtime.targets import Target

SensitivityPass = Literal["quantize.static", "quantize.dynamic", "prune.magnitude"]
# The layers each pass can be limited to, by node name (its nodes_to_exclude option).
LAYER_OPS: dict[str, tuple[str, ...]] = {
    "quantize.static": ("Conv", "MatMul", "Gemm"),
    "quantize.dynamic": ("Conv", "MatMul", "Gemm"),
    "prune.magnitude": ("Conv", "MatMul", "Gemm"),
}


@dataclass(frozen=True)
class _Layer:
    name: str
    op_type: str


def _layers(bundle: Bundle, pass_name: str, workdir: Path) -> tuple[list[_Layer], int]:
    model = bundle.load_model()
    if pass_name.startswith("quantize."):
        from slipstream.passes._quant import preprocess

        model, _ = preprocess(model, workdir)  # the quantizers name nodes after pre-processing
    ops = LAYER_OPS[pass_name]
    named = [_Layer(n.name, n.op_type) for n in model.graph.node if n.op_type in ops and n.name]
    unnamed = sum(1 for n in model.graph.node if n.op_type in ops and not n.name)
    return named, unnamed


def analyze_sensitivity(
    bundle: Bundle,
    dataset: Dataset,
    metric: Metric,
    *,
    pass_name: SensitivityPass = "quantize.static",
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    seed: int = 0,
    data: str | None = None,
) -> SensitivityReport:
    """Quality with the pass applied to each layer alone (and to all of them), against ``bundle``.

    ``data`` (a data reference like the recipe's) is what quantize.static calibrates on and what every
    pass measures its fidelity on; give the evaluation data's reference so that nothing is generated.
    """
    from slipstream.passes.recipe import optimize

    if pass_name not in LAYER_OPS:
        raise ConfigError(
            f"Sensitivity works with {', '.join(LAYER_OPS)}; got {pass_name!r}.",
            field="pass",
            hint="Pick one of those.",
        )
    started = time.perf_counter()
    opts = dict(options or {})
    target = Target(intra_op_threads=1)

    def quality_of(candidate: Bundle, reference: np.ndarray | None) -> tuple[float, np.ndarray]:
        outputs = predict(Engine(candidate, target), dataset)
        return score(metric, outputs, dataset, reference if reference is not None else outputs), outputs

    base_quality, reference = quality_of(bundle, None)
    with tempfile.TemporaryDirectory(prefix="slipstream-sensitivity-") as tmp:
        work = Path(tmp)
        layers, unnamed = _layers(bundle, pass_name, work)
        if not layers:
            raise ConfigError(
                f"No named {'/'.join(LAYER_OPS[pass_name])} layers in '{bundle.manifest.name}' to analyse.",
                field="pass",
            )
        everything = optimize(bundle, [(pass_name, opts)], work / "all", seed=seed, data=data)
        all_quality, _ = quality_of(everything, reference)
        rows: list[LayerSensitivity] = []
        names = [layer.name for layer in layers]
        for i, layer in enumerate(layers):
            if progress is not None:
                progress(i, len(layers), layer.name)
            others = tuple(n for n in names if n != layer.name)
            chain = [(pass_name, {**opts, "nodes_to_exclude": others})]
            one = optimize(bundle, chain, work / f"l{i}", seed=seed, data=data)
            quality, _ = quality_of(one, reference)
            drop = base_quality - quality if metric.higher_is_better else quality - base_quality
            rows.append(LayerSensitivity(node=layer.name, op_type=layer.op_type, quality=quality, drop=drop))
    rows.sort(key=lambda r: r.drop, reverse=True)
    return SensitivityReport(
        pass_name=pass_name,
        options=opts,
        metric=metric.name,
        baseline_quality=base_quality,
        all_layers_quality=all_quality,
        layers=tuple(rows),
        skipped_unnamed=unnamed,
        duration_s=time.perf_counter() - started,
    )
