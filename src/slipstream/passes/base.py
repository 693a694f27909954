"""The pass framework: a pass declares a frozen ``Config`` and one ``apply()``; the base does the rest.

The base class owns the mechanics every pass needs and no pass should repeat: the fingerprint of
(input model, ``name@version``, config), the on-disk cache keyed by it, timing, the fidelity check
against the input model, and exactly one lineage entry in the new bundle. The input bundle is only
read; the output is a new bundle written atomically.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.artifact.manifest import MONITORING_OUTPUTS
from slipstream.artifact.specs import graph_io_specs
from slipstream.data.datasets import arrays_digest
from slipstream.errors import BundleExistsError, ConfigError, PassError, SlipstreamError, validation_problems
from slipstream.passes.cache import PassCache
from slipstream.passes.fidelity import FIDELITY_DATA_ROWS, GENERATED, load_inputs, measure_fidelity

if TYPE_CHECKING:
    from collections.abc import Mapping

    import onnx

    from slipstream.artifact.manifest import Manifest

log = logging.getLogger(__name__)

ModelKind = Literal["torch", "onnx"]


class PassWarning(UserWarning):
    """A pass did what was asked, but the result is likely not what the user wants (e.g. slower)."""


class PassConfig(BaseModel):
    """Base for every pass config: frozen, no unknown keys, JSON round-trippable."""

    model_config = ConfigDict(frozen=True, extra="forbid")


C = TypeVar("C", bound=PassConfig)


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


class Pass(ABC, Generic[C]):
    """A named, versioned model transformation. Subclasses set the class attributes and ``Config``."""

    name: ClassVar[str]
    version: ClassVar[int]
    input_kind: ClassVar[ModelKind]
    output_kind: ClassVar[ModelKind]
    Config: type[C]

    @property
    def step_name(self) -> str:
        return f"{self.name}@{self.version}"

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


class OnnxPass(Pass[C]):
    """A pass from bundle to bundle (ONNX → ONNX)."""

    input_kind: ClassVar[ModelKind] = "onnx"
    output_kind: ClassVar[ModelKind] = "onnx"

    @abstractmethod
    def apply(self, model: onnx.ModelProto, config: C, ctx: PassContext) -> PassOutput:
        """Return a new model; ``model`` is a private copy and may be changed in place."""

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
        it instead of generated data, and passes that need data (quantize.static) use it.
        """
        cfg = config if config is not None else self.make_config()
        if Path(output).exists() and not overwrite:
            raise BundleExistsError(
                f"Refusing to write the output of {self.step_name} to '{output}': it already exists.",
                path=output,
                hint="Choose another output path, or pass overwrite=True (--overwrite).",
            )
        started = time.perf_counter()
        # The seed drives generated data (calibration, fidelity), so it is part of what the result depends on.
        arrays = load_inputs(Path(data), bundle.manifest.inputs) if data is not None else None
        data_sha = arrays_digest(arrays) if arrays is not None else None
        key = PassCache.key(bundle.model_sha256, self.step_name, sha256_json([self.config_hash(cfg), seed, data_sha]))
        hit = cache.get(key, self.name) if cache is not None else None
        if hit is not None:
            result = hit
        else:
            ctx_data = (arrays, f"file {data}") if arrays is not None else None
            result = self._compute(bundle, cfg, seed, ctx_data)
        duration = time.perf_counter() - started
        for text in result.warnings:
            warnings.warn(f"{self.step_name}: {text}", PassWarning, stacklevel=2)
        manifest = _output_manifest(bundle.manifest, result, self.name, cache_hit=hit is not None, seed=seed)
        step = Step(
            name=self.step_name,
            config=cfg.model_dump(mode="json"),
            duration_s=duration,
            input_sha256=bundle.model_sha256,
        )
        written = write_bundle(output, result.model, manifest, step=step, overwrite=overwrite)
        if cache is not None and hit is None:
            cache.put(key, self.name, result, step)
        return PassRun(
            bundle=written,
            step=self.step_name,
            duration_s=duration,
            cache_hit=hit is not None,
            warnings=tuple(result.warnings),
        )

    def _compute(
        self, bundle: Bundle, config: C, seed: int, data: tuple[dict[str, np.ndarray], str] | None
    ) -> PassOutput:
        original = bundle.load_model()
        work = bundle.load_model()  # apply() gets its own copy; the input bundle is never written
        with (
            tempfile.TemporaryDirectory(prefix=f"slipstream-{self.name}-") as tmp,
            contextlib.redirect_stdout(io.StringIO()) as chatter,
            _root_logging_kept(),
        ):
            # Some onnxruntime tools print progress to stdout, which would corrupt --json output.
            try:
                arrays, source = data if data is not None else (None, None)
                ctx = PassContext(bundle=bundle, workdir=Path(tmp), seed=seed, data=arrays, data_source=source)
                result = self.apply(work, config, ctx)
                result.metrics.setdefault("size_bytes_in", original.ByteSize())
                result.metrics.setdefault("size_bytes_out", result.model.ByteSize())
                if "fidelity" not in result.metrics:
                    feeds = {k: v[:FIDELITY_DATA_ROWS] for k, v in arrays.items()} if arrays is not None else None
                    result.metrics["fidelity"] = measure_fidelity(
                        original, result.model, bundle.manifest.inputs, seed, feeds, source or GENERATED
                    )
            except SlipstreamError:  # already clear (bad config or data, a named pass failure)
                raise
            except Exception as exc:  # third-party tools raise anything; name the pass and keep the cause
                raise PassError(
                    f"Pass {self.step_name} failed on '{bundle.manifest.name}': {type(exc).__name__}: {exc}",
                    pass_name=self.name,
                    hint="Check the pass options against the model; `slipstream inspect` shows its operators.",
                ) from exc
        if chatter.getvalue().strip():
            log.debug("%s printed: %s", self.step_name, chatter.getvalue().strip())
        return result


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Leave the caller's root logger as it was. Third-party tools call ``logging.basicConfig`` or the module-level
    ``logging.warning`` (which installs a stderr handler on a bare root logger): quantize.dynamic did, and every
    library's messages then reached the terminal, between a CLI's tables and a server's log lines."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)


def _output_manifest(parent: Manifest, result: PassOutput, key: str, *, cache_hit: bool, seed: int) -> Manifest:
    """The parent's manifest with this pass's resolved choices and metrics under its name."""
    inputs, outputs = graph_io_specs(result.model.graph)
    # A monitoring-only output (a classifier's embedding) stays out of what clients see, pass after pass.
    hidden = parent.resolved.get(MONITORING_OUTPUTS)
    outputs = tuple(s for s in outputs if not (isinstance(hidden, dict) and s.name in hidden))
    old = {s.name: s for s in (*parent.inputs, *parent.outputs)}
    # Keep the parent's specs (symbolic dim names, value ranges) where the tensor did not change type.
    inputs = tuple(old[s.name] if s.name in old and old[s.name].dtype == s.dtype else s for s in inputs)
    outputs = tuple(old[s.name] if s.name in old and old[s.name].dtype == s.dtype else s for s in outputs)
    slot = key
    n = 2
    while slot in parent.resolved or slot in parent.metrics:
        slot = f"{key}#{n}"
        n += 1
    resolved = {**result.resolved, "seed": seed, "cache": "hit" if cache_hit else "miss"}
    if result.warnings:
        resolved["warnings"] = list(result.warnings)
    return parent.model_copy(
        update={
            "inputs": inputs,
            "outputs": outputs,
            "resolved": {**parent.resolved, slot: resolved},
            "metrics": {**parent.metrics, slot: dict(result.metrics)},
        }
    )
