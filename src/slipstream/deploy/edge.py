"""The edge: onnxruntime's ORT format, the operator config of a minimal onnxruntime build, and a runner.

    DIR/<model>.ort                the model in ORT format (flatbuffers: loads without protobuf, mmap-able)
    DIR/required_operators.config  the operators it uses, for onnxruntime's `--include_ops_by_config` build
    DIR/edge.json                  the target (architecture, providers), sizes, operators and the parity proof
    DIR/run.py                     a runner that needs only numpy and onnxruntime, and refuses another target

Graph optimizations are saved at the 'extended' level: the fusions onnxruntime's CPU provider runs on every
CPU (a fused operator comes from onnxruntime's own domain and is listed in the build config), without the
'all' level's NCHWc layouts, which would tie the file to x86. It is also the level at which the file computes
what the bundle computes when served: measured on MiniLM int8 (dynamic), the 'basic' level's unfused
integer MatMuls moved outputs by up to 0.015 from the served bundle, 'extended' by 0.0. The converted model
is run beside the bundle on the same inputs (generated, or the caller's --parity-data) before it is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from slipstream.artifact.bundle import EXTERNAL_DATA_FILE, Bundle
from slipstream.deploy.base import DeployOptions, DeploySource, SourceBundle
from slipstream.deploy.edge_ops import OPERATOR_SETS, graph_operators, required_operators
from slipstream.deploy.edge_runner import RUNNER_SCRIPT
from slipstream.errors import DataError, ParityError

EDGE_FILE = "edge.json"
CONFIG_FILE = "required_operators.config"
ATOL, RTOL = 1e-4, 1e-3
PARITY_BATCH = 4


class EdgeDeployer:
    name: ClassVar[str] = "edge"

    def refusals(self, source: DeploySource, options: DeployOptions) -> list[str]:
        reasons = []
        if source.repository:
            reasons.append("an edge export holds one model: pass one bundle, not a repository")
        allowed = None
        if options.operator_set is not None:
            allowed = OPERATOR_SETS.get(options.operator_set)
            if allowed is None:
                reasons.append(
                    f"unknown operator set '{options.operator_set}'; expected one of {', '.join(sorted(OPERATOR_SETS))}"
                )
        for item in source.bundles:
            if EXTERNAL_DATA_FILE in item.bundle.manifest.files:
                reasons.append(
                    f"model '{item.name}' keeps its weights in {EXTERNAL_DATA_FILE}; the ORT format holds one file "
                    "under 2 GiB: quantize it (int8 or int4) first"
                )
            if allowed is not None:
                used = graph_operators(item.bundle.load_model(load_external_data=False))
                missing = sorted(f"{d or 'ai.onnx'}:{op}" for d, op in used if (d, op) not in allowed)
                if missing:
                    reasons.append(
                        f"model '{item.name}' uses operator(s) {', '.join(missing)}, outside the minimal operator set "
                        f"'{options.operator_set}': choose a larger set, or no --operator-set (the build config then "
                        "lists exactly what the model uses)"
                    )
        return reasons

    def write(self, source: DeploySource, options: DeployOptions, into: Path) -> list[Path]:
        (item,) = source.bundles
        ort_path = into / f"{item.name}.ort"
        convert_to_ort(item.bundle, ort_path, options.target_architecture)
        parity = check_parity(item.bundle, ort_path, _data_feeds(item.bundle, options.parity_data))
        ops = required_operators(ort_path)
        config = into / CONFIG_FILE
        config.write_text(ops.config_text(f"{item.name} version {item.version}"), encoding="utf-8")
        runner = into / "run.py"
        runner.write_text(RUNNER_SCRIPT, encoding="utf-8")
        record = edge_record(item, options, ort_path, ops.operator_count, ops.node_count, parity)
        info = into / EDGE_FILE
        info.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return [ort_path, config, runner, info]


def convert_to_ort(bundle: Bundle, dest: Path, architecture: str) -> None:
    """Save the bundle's model in ORT format, optimized at the portable 'extended' level, from its verified bytes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dest)
    options.add_session_config_entry("session.save_model_format", "ORT")
    # As onnxruntime's converter does: keep QDQ int8 weights as int8 only where the target's kernels take it.
    options.add_session_config_entry("session.qdqisint8allowed", "1" if architecture == "aarch64" else "0")
    ort.InferenceSession(bundle.read_model_bytes().model, options, providers=["CPUExecutionProvider"])


def parity_feeds(bundle: Bundle, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that fit the manifest: within each input's recorded range, else a standard normal (ints: 1)."""
    from slipstream.artifact.tensor import numpy_dtype

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in bundle.manifest.inputs:
        shape = tuple(d if isinstance(d, int) else (PARITY_BATCH if i == 0 else 8) for i, d in enumerate(spec.shape))
        dtype = numpy_dtype(spec.dtype)
        if spec.dtype == "string":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            low, high = spec.value_range or (1, 1)  # 1: a valid token id and an attention mask that keeps it
            feeds[spec.name] = rng.integers(int(low), int(high) + 1, size=shape).astype(dtype)
        elif spec.value_range is not None:
            feeds[spec.name] = rng.uniform(spec.value_range[0], spec.value_range[1], size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _data_feeds(bundle: Bundle, path: Path | None) -> dict[str, np.ndarray] | None:
    """The caller's real inputs for the parity check, checked against the manifest (None: generate them)."""
    if path is None:
        return None
    from slipstream.runtime import Engine, Target

    try:
        with np.load(path) as data:
            feeds = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot read parity data '{path}' as .npz: {exc}.", source=str(path)) from exc
    return Engine(bundle, Target(intra_op_threads=1)).check_inputs(feeds)


def check_parity(bundle: Bundle, ort_path: Path, feeds: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Run the bundle and the .ort file on the same inputs; one ParityError lists every output that differs."""
    import onnxruntime as ort

    from slipstream.runtime import Engine, Target

    source = "generated" if feeds is None else "data"
    feeds = parity_feeds(bundle) if feeds is None else feeds
    names = [s.name for s in bundle.manifest.outputs]
    expected = Engine(bundle, Target(intra_op_threads=1)).run(feeds, names)
    session = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(names, feeds), strict=True))
    worst: dict[str, float] = {}
    mismatches = []
    for name in names:
        want, have = np.asarray(expected[name]), np.asarray(got[name])
        if want.dtype.kind in "fc":
            error = float(np.max(np.abs(want.astype(np.float64) - have), initial=0.0))
            worst[name] = error
            if not np.allclose(have, want, atol=ATOL, rtol=RTOL, equal_nan=True):
                mismatches.append(f"{name}: max |ort - bundle| = {error:.3g} (atol {ATOL}, rtol {RTOL})")
        elif not np.array_equal(want, have):
            mismatches.append(f"{name}: {int(np.sum(want != have))} element(s) differ")
    if mismatches:
        raise ParityError(mismatches, source=str(bundle.path), hint="Report it with the bundle; export --to container.")
    rows = len(next(iter(feeds.values())))
    return {"inputs": source, "rows": rows, "atol": ATOL, "rtol": RTOL, "max_abs_error": worst}


def edge_record(
    item: SourceBundle, options: DeployOptions, ort_path: Path, operators: int, nodes: int, parity: dict[str, Any]
) -> dict[str, Any]:
    import onnxruntime as ort

    from slipstream.artifact.hashing import sha256_file

    manifest = item.bundle.manifest
    return {
        "model": item.name,
        "version": item.version,
        "bundle_model_sha256": item.bundle.model_sha256,
        "file": ort_path.name,
        "sha256": sha256_file(ort_path),
        "target": {
            "architecture": options.target_architecture,
            "providers": ["CPUExecutionProvider"],
            "onnxruntime": ort.__version__,
            "optimization": "extended",
        },
        "sizes": {
            "ort_bytes": ort_path.stat().st_size,
            "bundle_model_bytes": item.bundle.manifest.files["model.onnx"].size_bytes,
            "operator_types": operators,
            "nodes": nodes,
        },
        "operator_set": options.operator_set,
        "inputs": [s.model_dump(mode="json") for s in manifest.inputs],
        "outputs": [s.model_dump(mode="json") for s in manifest.outputs],
        "parity": parity,
    }
