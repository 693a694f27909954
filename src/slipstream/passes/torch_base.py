"""Torch passes: framework-model → framework-model steps that run before export.

A torch pass works on a :class:`TorchModel` in memory. The base records one step per pass (name,
config, duration, digests of the weights before and after, what it resolved and measured); the export
step turns those records into lineage entries of the bundle, so a bundle says how it was pruned and
trained before it became ONNX. Torch passes are not cached: their input lives in memory, and training
is the point of running them.
"""

from __future__ import annotations

import hashlib
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import JsonValue

from slipstream.passes.base import C, ModelKind, Pass
from slipstream.passes.torch_model import TorchData, TorchModel


@dataclass(frozen=True)
class TorchContext:
    """What a torch pass may use besides the model: data, the original model as teacher, a seed."""

    train: TorchData | None = None
    eval: TorchData | None = None
    teacher: Any = None
    seed: int = 0


@dataclass
class TorchPassOutput:
    model: TorchModel
    resolved: dict[str, JsonValue] = field(default_factory=dict)
    metrics: dict[str, JsonValue] = field(default_factory=dict)


def weights_digest(module: Any) -> str:
    """sha256 over the module's state dict (names, shapes, dtypes and bytes, in order)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes() if t.dtype.is_floating_point or t.dtype.is_signed else bytes(t.numpy()))
    return h.hexdigest()


class TorchPass(Pass[C]):
    """A pass from torch model to torch model; the base records the step."""

    input_kind: ClassVar[ModelKind] = "torch"
    output_kind: ClassVar[ModelKind] = "torch"

    @abstractmethod
    def apply(self, model: TorchModel, config: C, ctx: TorchContext) -> TorchPassOutput:
        """Return a new model; ``model`` must not be changed (work on ``model.copy()``)."""

    def run(self, model: TorchModel, config: C | None = None, ctx: TorchContext | None = None) -> TorchModel:
        cfg = config if config is not None else self.make_config()
        started = time.perf_counter()
        before = weights_digest(model.module)
        result = self.apply(model, cfg, ctx or TorchContext())
        out = result.model
        out.steps = [
            *model.steps,
            {
                "step": self.step_name,
                "config": cfg.model_dump(mode="json"),
                "duration_s": time.perf_counter() - started,
                "input_sha256": before,
                "output_sha256": weights_digest(out.module),
                "at": datetime.now(UTC).isoformat(),
                "resolved": result.resolved,
                "metrics": result.metrics,
            },
        ]
        return out
