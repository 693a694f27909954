"""The steps that make a bundle: ``export`` (a torch model in a recipe) and ``import`` (a build's source).

Both are passes like any other: a frozen config, one ``apply()`` that calls the importer (with its parity
proof) and returns the bundle it wrote in a scratch directory, and a declared tolerance. The runner
caches that bundle under the fingerprint of the model it came from, prefixes the lineage with the torch
steps that ran before (for ``export``), and writes it to its place. The importers stay where they are
(``slipstream.importers``); these passes only call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_file, sha256_json
from slipstream.passes.base import ModelKind, Pass, PassConfig, PassRun
from slipstream.passes.cache import PassCache
from slipstream.passes.runner import BundleContext, PassRunner
from slipstream.passes.tolerance import Tolerance
from slipstream.passes.torch_model import TorchModel


class ExportConfig(PassConfig):
    exporter: Literal["dynamo", "torchscript"] | None = Field(
        default=None, description="torch.onnx exporter; default dynamo."
    )
    opset: int | None = Field(default=None, ge=7, description="ONNX opset; default: the exporter's.")
    dynamic_axes: tuple[str, ...] = Field(
        default=(), description="Extra dynamic axes as NAME:AXIS=SYMBOL (the batch axis is always dynamic)."
    )
    skip_parity: bool = Field(default=False, description="Write the bundle without the parity proof (recorded).")


class ExportOnnx(Pass[ExportConfig, TorchModel, BundleContext, Bundle]):
    """export@1: a torch model becomes a bundle, proven against the torch model it came from.

    Its lineage entry is the importer's own ``import.torch@1``, after one entry per torch step.
    """

    name: ClassVar[str] = "export"
    version: ClassVar[int] = 1
    input_kind: ClassVar[ModelKind] = "torch"
    output_kind: ClassVar[ModelKind] = "onnx"
    Config = ExportConfig
    tolerance: ClassVar[Tolerance | None] = Tolerance(max_rel_error=1e-4)  # float32 export, same graph

    @property
    def lineage_name(self) -> str:
        return "import.torch@1"  # the importer writes the entry, with its parity proof

    def apply(self, model: TorchModel, config: ExportConfig, ctx: BundleContext) -> Bundle:
        from slipstream.importers.torch import import_torch

        return import_torch(
            model.module,
            ctx.workdir / "bundle",
            example_inputs=model.example_inputs,
            dynamic_axes=list(config.dynamic_axes) or None,
            exporter=config.exporter,
            opset=config.opset,
            skip_parity=config.skip_parity,
            name=ctx.name,
        )


class ImportConfig(PassConfig):
    input_shapes: tuple[str, ...] = Field(
        default=(), description='Input shapes for sources that do not carry them, e.g. "batch,1,8,8".'
    )
    dynamic_axes: tuple[str, ...] = Field(default=(), description="Dynamic axes as NAME:AXIS=SYMBOL.")


@dataclass(frozen=True)
class SourceModel:
    """A model before conversion: where it is, and the digest of what the conversion depends on."""

    location: str
    sha256: str


def source_model(location: str, module: Any = None) -> SourceModel | None:
    """The source at ``location`` with its content digest: a file's bytes, or a torch entry point's
    weights (``module``, already loaded by the caller) and code file. None when nothing can be hashed
    (a module path on sys.path with no module given): such a source is converted every time."""
    path = Path(location)
    if path.is_file():
        return SourceModel(location, sha256_file(path))
    if module is None:
        return None
    from slipstream.passes.torch_base import weights_digest

    code = Path(location.rpartition(":")[0])
    code_digest = sha256_file(code) if code.is_file() else None
    return SourceModel(location, sha256_json([weights_digest(module), code_digest]))


class ImportSource(Pass[ImportConfig, SourceModel, BundleContext, Bundle]):
    """import@1: a source model file or entry point becomes a bundle (any framework, with parity proof).

    Not a recipe step (a recipe starts from a bundle or a torch model): the build runs it for its
    baseline, so the conversion is cached like every other pass.
    """

    name: ClassVar[str] = "import"
    version: ClassVar[int] = 1
    input_kind: ClassVar[ModelKind] = "source"
    output_kind: ClassVar[ModelKind] = "onnx"
    Config = ImportConfig
    tolerance: ClassVar[Tolerance | None] = Tolerance(max_rel_error=1e-4)

    def apply(self, model: SourceModel, config: ImportConfig, ctx: BundleContext) -> Bundle:
        from slipstream.importers import convert

        return convert(
            model.location,
            ctx.workdir / "bundle",
            name=ctx.name,
            input_shapes=list(config.input_shapes) or None,
            dynamic_axes=list(config.dynamic_axes) or None,
        )


def import_source(
    location: str,
    output: str | Path,
    *,
    name: str,
    module: Any = None,
    input_shapes: tuple[str, ...] = (),
    dynamic_axes: tuple[str, ...] = (),
    cache: PassCache | bool = True,
) -> PassRun:
    """Convert the source at ``location`` into a bundle at ``output`` through the runner (``import@1``), so
    an unchanged source (same bytes, or same weights and code for an entry point whose ``module`` the
    caller has loaded) is answered by the pass cache."""
    from slipstream.passes.recipe import resolve_cache

    source = source_model(location, module)
    store = resolve_cache(cache) if source is not None else None
    model = source or SourceModel(location, "")
    config = ImportConfig(input_shapes=input_shapes, dynamic_axes=dynamic_axes)
    runner = PassRunner(cache=store)
    return runner.run_to_bundle(ImportSource(), lambda: model, model.sha256, output, config, name=name, overwrite=True)
