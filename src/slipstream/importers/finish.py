"""The tail every framework importer shares: check the ONNX model, prove parity, write the bundle.

A framework importer exports its model to an ``onnx.ModelProto`` and hands it here with a reference
(the source model as a function of numpy inputs). No bundle is written unless the parity proof
passes, or the caller asked to skip it, which the manifest then records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from pydantic import JsonValue

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.manifest import Framework, Manifest, ParityRecord, Source
from slipstream.artifact.specs import graph_io_specs
from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.data.datasets import LABELS
from slipstream.errors import ConfigError
from slipstream.importers.onnx import check_model
from slipstream.importers.parity import Reference, generated_cases, prove_parity, sample_cases, skipped
from slipstream.runtime.targets import int8_fusion

SampleData = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ImportJob:
    """Everything :func:`finish_import` needs besides the model: where it came from and how it was made."""

    framework: Framework
    step_name: str
    name: str
    version: str = "1"
    source_path: str | None = None
    source_sha256: str | None = None
    resolved: dict[str, JsonValue] = field(default_factory=dict)
    step_config: dict[str, JsonValue] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


def load_sample_data(sample: SampleData | str | os.PathLike[str] | None) -> dict[str, np.ndarray] | None:
    """Read sample inputs from an .npz file (one array per model input, keyed by input name)."""
    if sample is None:
        return None
    if isinstance(sample, Mapping):
        return {str(k): np.asarray(v) for k, v in sample.items()}
    path = Path(sample)
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise ConfigError(
            f"Expected sample data as an existing .npz file; got '{path}'.",
            field="sample_data",
            hint="Save it with numpy.savez('sample.npz', input_name=array, ...).",
        )
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def align_sample(sample: SampleData, inputs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """Match sample arrays to the model's inputs by name (or by position for unnamed ``arr_N`` keys)."""
    names = [s.name for s in inputs]
    # The same .npz serves evaluation elsewhere: its 'labels' array is not an input, so it is ignored here.
    sample = {k: v for k, v in sample.items() if not (k == LABELS and k not in names)}
    keys = list(sample)
    if set(keys) != set(names) and keys == [f"arr_{i}" for i in range(len(keys))] and len(keys) == len(names):
        sample = dict(zip(names, sample.values(), strict=True))
    if set(sample) != set(names):
        raise ConfigError(
            f"Sample data has arrays {sorted(sample)}; the model's inputs are {names}.",
            field="sample_data",
            hint="Name each array in the .npz after the model input it feeds.",
        )
    return {s.name: np.asarray(sample[s.name]).astype(numpy_dtype(s.dtype), copy=False) for s in inputs}


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
    *,
    reference: Reference,
    reference_name: str,
    sample: SampleData | None = None,
    skip_parity: bool = False,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Check ``model``, prove it matches ``reference`` (unless skipped), and write the bundle."""
    label = job.source_path or f"in-memory {job.framework} model"
    model = check_model(model, label)
    inputs, outputs = graph_io_specs(model.graph)
    parity: ParityRecord
    if skip_parity:
        parity = skipped(reference_name, "skip_parity was requested (--skip-parity)")
    else:
        cases = sample_cases(align_sample(sample, inputs)) if sample is not None else generated_cases(inputs)
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
        name=job.name,
        version=job.version,
        source=Source(framework=job.framework, path=job.source_path, sha256=job.source_sha256),
        inputs=inputs,
        outputs=outputs,
        resolved={"opset": opsets.get("ai.onnx"), "opsets": dict(opsets), **job.resolved},
        parity=parity,
    )
    step = Step(
        name=job.step_name,
        config=job.step_config,
        duration_s=time.perf_counter() - job.started,
        input_sha256=job.source_sha256,
    )
    return write_bundle(output, model, manifest, step=step, overwrite=overwrite)
