"""The pass protocol: a pass declares a frozen ``Config``, one ``apply()`` and the tolerance it promises.

Three kinds of pass share this one shape: ONNX passes (bundle → bundle), torch passes (torch model →
torch model, before export) and the export step (torch model → bundle, through the PyTorch importer).
None of them runs itself: :class:`slipstream.passes.runner.PassRunner` owns the mechanics every pass
needs and no pass should repeat: the fingerprint of (input model, ``name@version``, config), the
on-disk cache keyed by it, timing, the fidelity check, and exactly one typed lineage entry per pass.
The input is only read; the output is new.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeAlias, TypeVar

import numpy as np
import onnx
from pydantic import JsonValue, ValidationError

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.errors import ConfigError, validation_problems
from slipstream.frozen import Frozen
from slipstream.passes.tolerance import Tolerance

if TYPE_CHECKING:
    from collections.abc import Mapping

    from slipstream.passes.cache import PassCache


# "source": a model file or entry point before conversion (the import step's input; never in a recipe).
ModelKind = Literal["torch", "onnx", "source"]


class PassWarning(UserWarning):
    """A pass did what was asked, but the result is likely not what the user wants (e.g. slower)."""


class PassConfig(Frozen):
    """Base for every pass config: frozen, no unknown keys, JSON round-trippable."""


C = TypeVar("C", bound=PassConfig)
In = TypeVar("In")  # what apply() takes: an onnx.ModelProto, a TorchModel
X = TypeVar("X")  # what apply() may read besides the model
Out = TypeVar("Out")  # what apply() returns: the new model with what it chose and measured


@dataclass(frozen=True)
class PassContext:
    """What ``apply()`` may read besides the model: the input bundle, a scratch directory, a seed, and
    the recipe's real input data (arrays named like the inputs) when the user gave some."""

    bundle: Bundle
    workdir: Path
    seed: int
    data: dict[str, np.ndarray] | None = None
    data_source: str | None = None


@dataclass
class PassOutput:
    """What ``apply()`` returns: the new model and what it chose and measured."""

    model: onnx.ModelProto
    resolved: dict[str, JsonValue] = field(default_factory=dict)
    metrics: dict[str, JsonValue] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PassRun:
    """The outcome of one pass: the bundle it wrote and whether the cache answered."""

    bundle: Bundle
    step: str
    duration_s: float
    cache_hit: bool
    warnings: tuple[str, ...]


class Pass(ABC, Generic[C, In, X, Out]):
    """A named, versioned model transformation. Subclasses set the class attributes, ``Config`` and
    ``tolerance``, and implement ``apply``; a runner does everything else."""

    name: ClassVar[str]
    version: ClassVar[int]
    input_kind: ClassVar[ModelKind]
    output_kind: ClassVar[ModelKind]
    Config: type[C]
    # What the pass promises about its outputs on a trained model at its default config; the conformance
    # suite holds every catalogue entry to it. None: the pass has not declared one (the suite fails it).
    tolerance: ClassVar[Tolerance | None] = None

    @abstractmethod
    def apply(self, model: In, config: C, ctx: X) -> Out:
        """Return a new model; ``model`` is the runner's private copy (never the caller's input)."""

    @property
    def step_name(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def lineage_name(self) -> str:
        """The name of the lineage entry this pass adds (its step name, unless another step writes it)."""
        return self.step_name

    def make_config(self, values: Mapping[str, Any] | None = None) -> C:
        """Validate ``values`` into this pass's config; every problem is listed in one ConfigError."""
        try:
            return self.Config.model_validate(dict(values or {}))
        except ValidationError as exc:
            problems = validation_problems(exc)
            fields = ", ".join(sorted(self.Config.model_fields))
            raise ConfigError(
                f"Invalid config for pass {self.step_name}: {problems}.",
                field=self.name,
                hint=f"{self.name} takes: {fields}.",
            ) from exc

    def fingerprint_inputs(self, config: C) -> dict[str, JsonValue]:
        """Extra content the result depends on beyond the config (e.g. a calibration file's sha256)."""
        return {}

    def config_hash(self, config: C) -> str:
        return sha256_json({"config": config.model_dump(mode="json"), "inputs": self.fingerprint_inputs(config)})


AnyPass: TypeAlias = "Pass[Any, Any, Any, Any]"


class OnnxPass(Pass[C, onnx.ModelProto, PassContext, PassOutput]):
    """A pass from bundle to bundle (ONNX → ONNX)."""

    input_kind: ClassVar[ModelKind] = "onnx"
    output_kind: ClassVar[ModelKind] = "onnx"

    def run(
        self,
        bundle: Bundle,
        output: str | Path,
        config: C | None = None,
        *,
        cache: PassCache | None = None,
        seed: int = 0,
        data: str | Path | None = None,
        overwrite: bool = False,
    ) -> PassRun:
        """Apply this pass to ``bundle`` and write the result to ``output`` (with one new lineage entry).

        ``data`` is an .npz of real inputs (arrays named like the model's inputs): fidelity is measured on
        it instead of generated data, and passes that need data (quantize.static) use it. A shorthand for
        :meth:`PassRunner.run_onnx`.
        """
        from slipstream.passes.runner import PassRunner

        runner = PassRunner(cache=cache, seed=seed, data=Path(data) if data is not None else None)
        return runner.run_onnx(self, bundle, output, config, overwrite=overwrite)
