"""manifest.json: what a bundle holds, where it came from and what was measured on it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field, JsonValue

from slipstream.artifact.tensor import TensorSpec
from slipstream.frozen import Frozen

SCHEMA_VERSION = 1
MONITORING_OUTPUTS = "monitoring_outputs"
"""Key in ``Manifest.resolved``: graph outputs for the monitor only (name -> what they are), never in
``Manifest.outputs``, so clients never see them; the engine returns them only when asked by name, and a pass
keeps them out of its output bundle's ``outputs``."""


def current_version() -> str:
    from slipstream import __version__

    return __version__


Framework = Literal["onnx", "torch", "keras", "tensorflow", "tflite", "sklearn", "lightgbm", "xgboost", "catboost"]


class Source(Frozen):
    """The model a bundle was made from."""

    framework: Framework = Field(description="The framework of the source model.")
    path: str | None = Field(default=None, description="The source file, when it came from one.")
    sha256: str | None = Field(default=None, description="Digest of the source file.")


class LineageEntry(Frozen):
    """One step that produced this bundle from its parent."""

    step: str = Field(description="Stable name with version, e.g. 'import.onnx@1' or 'quantize.dynamic@1'.")
    config: dict[str, JsonValue] = Field(default_factory=dict, description="The step's resolved config.")
    duration_s: float = Field(ge=0, description="Wall time the step took, in seconds.")
    input_sha256: str | None = Field(default=None, description="Digest of the step's input model.")
    output_sha256: str = Field(description="Digest of the model.onnx the step wrote.")
    at: datetime = Field(description="When the step finished (UTC).")


class OutputParity(Frozen):
    """How one output of the converted model compared with the source on one input case."""

    output: str
    max_abs_error: float = Field(description="Largest |onnx - source| over all elements (0 when exact).")
    max_rel_error: float = Field(description="Largest |onnx - source| / max(|source|, tiny).")
    atol: float = Field(description="Absolute tolerance applied.")
    rtol: float = Field(description="Relative tolerance applied.")
    exact: bool = Field(description="Compared for equality (integer, bool and string outputs).")
    passed: bool


class ParityCase(Frozen):
    """One set of inputs both models ran on."""

    batch: int
    dims: dict[str, int] = Field(default_factory=dict, description="Sizes given to symbolic non-batch dims.")
    outputs: tuple[OutputParity, ...]


class ParityRecord(Frozen):
    """The numerical parity proof of a conversion, or the record that it was skipped on request."""

    status: Literal["passed", "skipped"]
    reference: str = Field(description="What the ONNX model was compared with, e.g. 'torch eager'.")
    data: Literal["sample", "generated", "none"] = Field(description="Where the inputs came from.")
    cases: tuple[ParityCase, ...] = Field(default=())
    reason: str | None = Field(default=None, description="Why the proof was skipped, when it was.")
    informative: bool = Field(
        default=True,
        description="False when an output did not vary over the parity inputs: a broken conversion could pass.",
    )
    warnings: tuple[str, ...] = Field(default=(), description="What weakens the proof, and what to pass instead.")


class FileDigest(Frozen):
    sha256: str
    size_bytes: int = Field(ge=0)


class Manifest(Frozen):
    """The bundle's description. Frozen: change it with ``model_copy(update=...)``."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Manifest schema version.")
    name: str = Field(min_length=1, description="Model name; also the serving name.")
    version: str = Field(default="1", min_length=1, description="Model version.")
    created_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When the bundle was written (UTC)."
    )
    slipstream_version: str = Field(
        default_factory=current_version, description="The slipstream version that wrote it."
    )
    source: Source
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    lineage: tuple[LineageEntry, ...] = Field(default=())
    resolved: dict[str, JsonValue] = Field(
        default_factory=dict, description="Choices made on the user's behalf (opset, exporter, provider...)."
    )
    metrics: dict[str, JsonValue] = Field(default_factory=dict, description="Measured quality and speed.")
    parity: ParityRecord | None = Field(
        default=None, description="The conversion's parity proof (None for an ONNX source: nothing converted)."
    )
    files: dict[str, FileDigest] = Field(
        default_factory=dict, description="sha256 and size of every file in the bundle but the manifest."
    )
