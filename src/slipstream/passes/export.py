"""export: the torch → ONNX step of a recipe, through the PyTorch importer and its parity proof.

The torch steps that ran before it become lineage entries of the bundle (with digests of the weights
before and after each), followed by the importer's own ``import.torch@1`` entry.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, JsonValue

from slipstream.artifact.bundle import Bundle, write_bundle
from slipstream.artifact.manifest import LineageEntry
from slipstream.passes.base import ModelKind, Pass, PassConfig
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


def _lineage(steps: list[dict[str, Any]]) -> tuple[LineageEntry, ...]:
    return tuple(
        LineageEntry(
            step=s["step"],
            config=s["config"],
            duration_s=s["duration_s"],
            input_sha256=s["input_sha256"],
            output_sha256=s["output_sha256"],
            at=datetime.fromisoformat(s["at"]),
        )
        for s in steps
    )


class ExportOnnx(Pass[ExportConfig]):
    """export@1: a torch model becomes a bundle, proven against the torch model it came from."""

    name: ClassVar[str] = "export"
    version: ClassVar[int] = 1
    input_kind: ClassVar[ModelKind] = "torch"
    output_kind: ClassVar[ModelKind] = "onnx"
    Config = ExportConfig

    def export(
        self, model: TorchModel, output: str | Path, config: ExportConfig, *, name: str, overwrite: bool = False
    ) -> Bundle:
        from slipstream.importers.torch import import_torch

        target = Path(output)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.export-", dir=target.parent) as tmp:
            exported = import_torch(
                model.module,
                Path(tmp) / "bundle",
                example_inputs=model.example_inputs,
                dynamic_axes=list(config.dynamic_axes) or None,
                exporter=config.exporter,
                opset=config.opset,
                skip_parity=config.skip_parity,
                name=name,
            )
            m = exported.manifest
            resolved: dict[str, JsonValue] = dict(m.resolved)
            metrics: dict[str, JsonValue] = dict(m.metrics)
            for s in model.steps:
                resolved[s["step"]] = s["resolved"]
                metrics[s["step"]] = s["metrics"]
            manifest = m.model_copy(
                update={"lineage": (*_lineage(model.steps), *m.lineage), "resolved": resolved, "metrics": metrics}
            )
            bundle = write_bundle(target, exported.load_model(), manifest, overwrite=overwrite)
            shutil.rmtree(exported.path, ignore_errors=True)
        return bundle
