"""Torch passes: framework-model → framework-model steps that run before export.

A torch pass works on a :class:`TorchModel` in memory. The runner records one typed step per pass
(:class:`TorchStep`: name, config, duration, digests of the weights before and after, what it resolved
and measured); the export step turns those into lineage entries of the bundle, so a bundle says how it
was pruned and trained before it became ONNX. A torch pass's output is not stored in the cache (it
lives in memory, and training is the point of running it); the export after it is, under a key
that chains every torch step's fingerprint.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from dataclasses import dataclass, field
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


class TorchPass(Pass[C, TorchModel, TorchContext, TorchPassOutput]):
    """A pass from torch model to torch model."""

    input_kind: ClassVar[ModelKind] = "torch"
    output_kind: ClassVar[ModelKind] = "torch"

    @abstractmethod
    def apply(self, model: TorchModel, config: C, ctx: TorchContext) -> TorchPassOutput:
        """Return a new model; ``model`` must not be changed (work on ``model.copy()``)."""

    def run(self, model: TorchModel, config: C | None = None, ctx: TorchContext | None = None) -> TorchModel:
        """A shorthand for :meth:`PassRunner.run_torch` with ``ctx``'s data, teacher and seed."""
        from slipstream.passes.runner import PassRunner

        c = ctx or TorchContext()
        return PassRunner(seed=c.seed, train=c.train, eval=c.eval, teacher=c.teacher).run_torch(self, model, config)
