"""How far a pass moved the model's outputs: the same generated inputs through both models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import JsonValue

from slipstream.artifact.tensor import TensorSpec
from slipstream.data.datasets import load_dataset
from slipstream.data.synthetic import example_inputs
from slipstream.errors import ConfigError

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

FIDELITY_BATCH = 8
GENERATED = "generated (standard normal / small ints)"
# Rows of user data that fidelity is measured on.
FIDELITY_DATA_ROWS = 64


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A one-thread CPU session on an in-memory model, at graph optimization 'extended'.

    Fidelity compares numbers, not speed, and the 'all' level's layout rewrites (NCHWc, MatMul-Transpose
    fusion) segfault onnxruntime on some fp16 attention graphs: the build then measures such a model at the
    safer level it finds, instead of losing the candidate to its fidelity check.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    if denom == 0.0:
        return 1.0 if float(np.abs(x - y).max(initial=0.0)) == 0.0 else 0.0
    return float(np.dot(x, y) / denom)


def measure_fidelity(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    inputs: Sequence[TensorSpec],
    seed: int,
    feeds: dict[str, np.ndarray] | None = None,
    data_note: str = GENERATED,
) -> dict[str, JsonValue]:
    """Per-output max |diff| and cosine on ``feeds`` (default: generated). The output model must run."""
    if feeds is None:
        try:
            feeds = example_inputs(inputs, FIDELITY_BATCH, seed=seed)
        except ConfigError as exc:
            return {"skipped": f"no generated data for these inputs: {exc.message}"}
    ref = session(before)
    new = session(after)
    names = [o.name for o in ref.get_outputs()]
    got = dict(zip([o.name for o in new.get_outputs()], new.run(None, feeds), strict=True))
    want = dict(zip(names, ref.run(None, feeds), strict=True))
    per_output: dict[str, JsonValue] = {}
    for name in names:
        if name not in got:
            continue
        a, b = np.asarray(want[name]), np.asarray(got[name])
        if a.shape != b.shape or a.dtype.kind not in "fiub":
            per_output[name] = {"comparable": False}
            continue
        per_output[name] = {
            "max_abs_diff": float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0)),
            "cosine": round(cosine(a, b), 6),
        }
    batch = int(min(len(v) for v in feeds.values())) if feeds else 0
    return {"data": data_note, "batch": batch, "outputs": per_output}


def load_inputs(path: Path, specs: Sequence[TensorSpec], limit: int | None = None) -> dict[str, np.ndarray]:
    """The first ``limit`` rows of each input from a data source (.npz, .csv, .parquet or ``file.py:fn``).

    Checked and cast by :func:`slipstream.data.datasets.load_dataset`; labels, if any, are ignored here.
    """
    dataset = load_dataset(path, specs)
    return dict(dataset.take(limit).inputs) if limit is not None else dict(dataset.inputs)
