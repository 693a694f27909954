"""The framework model that torch passes work on: a module, its example inputs, and labelled data.

torch is imported lazily by the functions here; importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import JsonValue

from slipstream.artifact.bundle import Step
from slipstream.artifact.manifest import LineageEntry
from slipstream.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    import torch

Task = Literal["classification", "regression"]


def require_torch(feature: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("torch", extra="torch", feature=feature) from exc


@dataclass
class TorchData:
    """Inputs and targets as numpy arrays (rows on axis 0); classification targets are class ids."""

    inputs: np.ndarray
    targets: np.ndarray

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ConfigError(
                f"Training data has {len(self.inputs)} input rows but {len(self.targets)} targets.",
                field="data",
                hint="Give one target per input row.",
            )
        if len(self.inputs) == 0:
            raise ConfigError("Training data is empty.", field="data")

    @property
    def task(self) -> Task:
        return "classification" if self.targets.dtype.kind in "iub" else "regression"

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        order = np.random.default_rng(seed).permutation(len(self.inputs)) if shuffle else np.arange(len(self.inputs))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield torch.from_numpy(self.inputs[idx]), torch.from_numpy(self.targets[idx])


@dataclass(frozen=True)
class TorchStep:
    """One torch pass as it will appear in the bundle's lineage once exported.

    ``step`` is the artifact's own :class:`Step` (name, config, duration, input digest); the output
    digest is that of the weights the pass produced, since the model is not ONNX yet.
    """

    step: Step
    output_sha256: str
    at: datetime
    resolved: dict[str, JsonValue] = field(default_factory=dict)
    metrics: dict[str, JsonValue] = field(default_factory=dict)

    def lineage_entry(self) -> LineageEntry:
        return LineageEntry(
            step=self.step.name,
            config=self.step.config,
            duration_s=self.step.duration_s,
            input_sha256=self.step.input_sha256,
            output_sha256=self.output_sha256,
            at=self.at,
        )


@dataclass
class TorchModel:
    """A torch module with example inputs (for tracing and export) and the torch steps applied so far.

    ``fingerprint`` names the content for the pass cache: the source's weights digest (and its code's,
    when the caller knows it), then, after each pass, the cache key of that pass. It lets the runner
    find an exported result without running the torch passes that would produce it. None means "the
    weights digest of ``module``", computed when first needed.
    """

    module: Any
    example_inputs: tuple[Any, ...]
    steps: tuple[TorchStep, ...] = ()
    fingerprint: str | None = None

    def copy(self) -> TorchModel:
        """A deep copy: passes never change the model they were given."""
        import copy

        return TorchModel(copy.deepcopy(self.module), self.example_inputs, self.steps, self.fingerprint)


def loss_fn(task: Task) -> Any:
    import torch.nn.functional as F  # noqa: N812

    return F.cross_entropy if task == "classification" else F.mse_loss


def evaluate(module: Any, data: TorchData, batch_size: int = 512) -> float:
    """Accuracy for classification, negative MSE for regression (higher is better in both)."""
    import torch

    module.eval()
    correct, total, sq = 0, 0, 0.0
    with torch.no_grad():
        for x, y in data.batches(batch_size):
            out = module(x)
            if data.task == "classification":
                correct += int((out.argmax(dim=-1) == y).sum())
            else:
                sq += float(((out.reshape(y.shape) - y) ** 2).sum())
            total += len(y)
    return correct / total if data.task == "classification" else -sq / total


def count_macs(module: Any, example_inputs: tuple[Any, ...]) -> tuple[int, int]:
    """(multiply-accumulates, parameters) of one forward pass on the example inputs."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, example_inputs)
    return int(macs), int(params)
