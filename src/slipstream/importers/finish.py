"""The tail every framework importer shares: check the ONNX model, prove parity, write the bundle.

A framework importer exports its model to an ``onnx.ModelProto`` and hands it here with a reference
(the source model as a function of numpy inputs) and its :class:`~slipstream.importers.framing.Framing`.
No bundle is written unless the parity proof passes, or the caller asked to skip it, which the manifest
then records. Integer inputs that index an embedding table get that table's range recorded in their
spec first, so the generated parity inputs are valid token ids.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from pydantic import JsonValue

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.manifest import Framework, Manifest, ParityRecord, Source
from slipstream.artifact.specs import graph_io_specs
from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.importers.framing import Framing, SampleData, match_sample_names
from slipstream.importers.input_ranges import with_graph_ranges
from slipstream.importers.onnx import check_model
from slipstream.importers.parity import (
    DEFAULT_DIM_SIZES,
    Reference,
    generated_cases,
    prove_parity,
    sample_cases,
    skipped,
)
from slipstream.runtime.targets import int8_fusion


@dataclass(frozen=True)
class ImportJob:
    """What :func:`finish_import` needs to know about the source besides the model: where it came from and
    how it was made (the shared options travel in the :class:`Framing`)."""

    framework: Framework
    step_name: str
    default_name: str
    source_path: str | None = None
    source_sha256: str | None = None
    resolved: dict[str, JsonValue] = field(default_factory=dict)
    step_config: dict[str, JsonValue] = field(default_factory=dict)


def align_sample(sample: SampleData, inputs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """Match sample arrays to the model's inputs (see :func:`match_sample_names`) and cast them to its dtypes."""
    named = match_sample_names(sample, [s.name for s in inputs])
    return {s.name: np.asarray(named[s.name]).astype(numpy_dtype(s.dtype), copy=False) for s in inputs}


def name_batch_dims(model: onnx.ModelProto) -> None:
    """Give an anonymous leading dim of every graph input and output the symbol ``batch``."""
    for info in (*model.graph.input, *model.graph.output):
        dims = info.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value") and not dims[0].dim_param:
            dims[0].dim_param = "batch"


def finish_import(
    model: onnx.ModelProto,
    output: str | os.PathLike[str],
    job: ImportJob,
    frame: Framing,
    *,
    reference: Reference,
    reference_name: str,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
) -> Bundle:
    """Check ``model``, prove it matches ``reference`` (unless skipped), and write the bundle."""
    label = job.source_path or f"in-memory {job.framework} model"
    model = check_model(model, label)
    inputs, outputs = graph_io_specs(model.graph)
    inputs = with_graph_ranges(inputs, model)
    parity: ParityRecord
    if frame.skip_parity:
        parity = skipped(reference_name, "skip_parity was requested (--skip-parity)")
    else:
        sample = frame.sample
        lengths = frame.parity_lengths or DEFAULT_DIM_SIZES
        cases = (
            sample_cases(align_sample(sample, inputs))
            if sample is not None
            else generated_cases(inputs, dim_sizes=lengths)
        )
        # Proven the way the engine will run it on this CPU (int8 fused or not; the engine decides the same).
        fuse_int8, _ = int8_fusion(job.resolved.get("quantized") is True)
        parity = prove_parity(
            reference,
            model.SerializeToString(),
            outputs,
            cases,
            reference_name=reference_name,
            data="sample" if sample is not None else "generated",
            tolerances=tolerances,
            source=label,
            fuse_int8=fuse_int8,
        )
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    manifest = Manifest(
        name=frame.model_name(job.default_name),
        version=frame.version,
        source=Source(framework=job.framework, path=job.source_path, sha256=job.source_sha256),
        inputs=inputs,
        outputs=outputs,
        resolved={"opset": opsets.get("ai.onnx"), "opsets": dict(opsets), **job.resolved},
        parity=parity,
    )
    step = Step(
        name=job.step_name,
        config=job.step_config,
        duration_s=time.perf_counter() - frame.started,
        input_sha256=job.source_sha256,
    )
    return write_bundle(output, model, manifest, step=step, overwrite=frame.overwrite)
