"""prune.magnitude / prune.random: unstructured sparsity on ONNX weight initializers.

Zeroing weights gives no speed and no file-size gain in ONNX/onnxruntime (measured here, even at
80 %): dense kernels multiply the zeros. What it buys is compressibility, so the pass reports the
gzip size before and after. Speed needs structured pruning (the torch pass prune.structured).
"""

from __future__ import annotations

import gzip
from typing import Literal

import numpy as np
import onnx
from pydantic import Field, JsonValue

from slipstream.passes._onnx import Weight, find_weights, replace_initializer
from slipstream.passes.base import OnnxPass, PassConfig, PassContext, PassOutput
from slipstream.passes.tolerance import Tolerance

GZIP_LEVEL = 6


class PruneConfig(PassConfig):
    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0, description="Fraction of the chosen weights set to zero.")
    scope: Literal["per_layer", "global"] = Field(
        default="per_layer", description="Reach the sparsity in every layer, or across all chosen weights at once."
    )
    op_types: tuple[str, ...] = Field(
        default=("MatMul", "Gemm", "Conv"), description="Operators whose constant weights are pruned."
    )
    min_elements: int = Field(default=256, ge=1, description="Leave weights smaller than this untouched.")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="Node names whose weights are kept.")
    seed: int = Field(default=0, description="Seed for prune.random (ignored by prune.magnitude).")


def gzip_size(model: onnx.ModelProto) -> int:
    return len(gzip.compress(model.SerializeToString(), compresslevel=GZIP_LEVEL, mtime=0))


class _Prune(OnnxPass[PruneConfig]):
    version = 1
    Config = PruneConfig
    criterion: str

    def scores(self, weights: list[Weight], config: PruneConfig) -> list[np.ndarray]:
        raise NotImplementedError

    def apply(self, model: onnx.ModelProto, config: PruneConfig, ctx: PassContext) -> PassOutput:
        weights = find_weights(model, config.op_types, config.min_elements, config.nodes_to_exclude)
        scores = self.scores(weights, config)
        if config.scope == "global" and weights:
            everything = np.concatenate([s.ravel() for s in scores])
            k = int(config.sparsity * everything.size)
            threshold = np.partition(everything, k)[k] if k < everything.size else np.inf
            masks = [s >= threshold for s in scores]
        else:
            masks = []
            for s in scores:
                k = int(config.sparsity * s.size)
                order = np.argsort(s, axis=None, kind="stable")
                mask = np.ones(s.size, dtype=bool)
                mask[order[:k]] = False
                masks.append(mask.reshape(s.shape))
        per_layer: dict[str, JsonValue] = {}
        zeros = total = 0
        gz_before = gzip_size(model)
        for w, mask in zip(weights, masks, strict=True):
            pruned = np.where(mask, w.array, np.float32(0)).astype(np.float32)
            replace_initializer(model, w.name, pruned)
            z = int((pruned == 0).sum())
            per_layer[w.name] = round(z / pruned.size, 4)
            zeros += z
            total += pruned.size
        warnings: list[str] = []
        if not weights:
            warnings.append("no weight was pruned: no chosen operator has a large enough constant weight.")
        resolved: dict[str, JsonValue] = {
            "criterion": self.criterion,
            "scope": config.scope,
            "pruned_weights": [w.name for w in weights],
            "note": "unstructured sparsity: no speed or file-size gain in onnxruntime; it compresses (gzip)",
        }
        metrics: dict[str, JsonValue] = {
            "sparsity": round(zeros / total, 4) if total else 0.0,
            "sparsity_per_layer": per_layer,
            "gzip_bytes_in": gz_before,
            "gzip_bytes_out": gzip_size(model),
        }
        return PassOutput(model=model, resolved=resolved, metrics=metrics, warnings=warnings)


class PruneMagnitude(_Prune):
    """Zero the weights of smallest magnitude."""

    name = "prune.magnitude"
    tolerance = Tolerance(min_top1=0.9)  # at half the weights of a trained model, before any retraining
    criterion = "magnitude |w|"

    def scores(self, weights: list[Weight], config: PruneConfig) -> list[np.ndarray]:
        return [np.abs(w.array) for w in weights]


class PruneRandom(_Prune):
    """Zero weights chosen at random (a baseline for magnitude pruning); seeded."""

    name = "prune.random"
    tolerance = Tolerance(min_top1=0.3)  # an ablation baseline: only above chance at half the weights
    criterion = "random"

    def scores(self, weights: list[Weight], config: PruneConfig) -> list[np.ndarray]:
        rng = np.random.default_rng(config.seed)
        return [rng.random(w.array.shape) for w in weights]
