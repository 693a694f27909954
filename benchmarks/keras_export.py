"""tf2onnx `from_function` vs Keras 3's `model.export(format="onnx")` on the seed's Keras models.

For each model and exporter: export time (median of REPEATS), the parity proof's largest error against
`model.predict` (through the real importer), ONNX node count and op histogram, and onnxruntime latency
(1 intra-op thread, median of many runs) at batch 1 and 32. SavedModel and TFLite files go through
tf2onnx only (Keras cannot export what it cannot load); they are listed for completeness.

Keras' exporter monkey-patches tf2onnx once per process (numpy 2 fixes), so every tf2onnx row is
measured before the first Keras export.

    .venv/bin/python benchmarks/keras_export.py            # prints and writes benchmarks/results/keras-export.md
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tests import keras_models as km  # noqa: E402

from slipstream.artifact import Bundle  # noqa: E402
from slipstream.importers import convert  # noqa: E402
from slipstream.importers.keras import export_keras, import_keras  # noqa: E402

REPEATS = 5
CHOICE = """
## Choice: tf2onnx `from_function` (default), Keras' exporter kept as `exporter="keras"`

Keras 3 with the TensorFlow backend exports ONNX by calling the same `tf2onnx.convert.from_function`
on a traced `call(training=False)`, so at the same opset the graphs are identical (same nodes, same
parity error, ORT latency within run-to-run noise). The differences are around the call:

- Keras' exporter refuses a model never called in this process ("The model provided has never called"),
  including one just loaded from a `.keras` file: the importer must call it on a dummy batch first.
- It monkey-patches tf2onnx and sets `np.object` for numpy 2 once per process; that probe emits a
  `FutureWarning` (an error under our `filterwarnings = error`) and changes tf2onnx for every later
  conversion in the process.
- It names outputs `Identity:0`; calling tf2onnx on a function that returns a dict keyed by the
  model's output names gives the ONNX outputs those names directly (`probabilities`, not `Identity:0`).
- Its default opset is 15; tf2onnx is driven at opset 17 here.
- Keras cannot load a bare SavedModel or a TFLite file, so those paths need tf2onnx anyway
  (`tf_loader.from_saved_model` + `from_graph_def` for a chosen signature, `from_tflite`).

Not used: `tf2onnx.convert.from_keras`, which fails on Keras 3 models (`KeyError: 'keras_tensor_N'`).
Both paths name the dynamic batch axis `unk__N` (a different N per tensor); the importer renames it `batch`.
"""
LATENCY_BUDGET_S = 1.0


def ort_latency_ms(model_path: Path, feeds: dict[str, np.ndarray]) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    times = []
    deadline = time.perf_counter() + LATENCY_BUDGET_S
    while time.perf_counter() < deadline or len(times) < 20:
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def feeds_for(bundle: Bundle, batch: int) -> dict[str, np.ndarray]:
    from slipstream.data.synthetic import example_inputs

    return example_inputs(bundle.manifest.inputs, batch, seed=7)


def describe(bundle: Bundle) -> dict[str, Any]:
    graph = onnx.load(str(bundle.model_path)).graph
    ops = Counter(n.op_type for n in graph.node)
    parity = bundle.manifest.parity
    assert parity is not None
    return {
        "nodes": sum(ops.values()),
        "ops": ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())),
        "max_err": max(o.max_abs_error for c in parity.cases for o in c.outputs),
        "b1_ms": ort_latency_ms(bundle.model_path, feeds_for(bundle, 1)),
        "b32_ms": ort_latency_ms(bundle.model_path, feeds_for(bundle, 32)),
        "opset": bundle.manifest.resolved.get("opset"),
    }


def export_time_s(model: Any, exporter: str) -> float:
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        export_keras(model, exporter=exporter)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="keras-export-"))
    models = {"seed MLP 784→64→10": km.seed_mlp(), "seed conv pair 64@3×3 → 32@1×1": km.seed_conv_pair()}
    rows: list[dict[str, Any]] = []
    for exporter in ("tf2onnx", "keras"):
        for label, model in models.items():
            seconds = export_time_s(model, exporter)
            bundle = import_keras(model, work / f"{label[:8]}-{exporter}".replace(" ", "_"), exporter=exporter)  # type: ignore[arg-type]
            rows.append({"model": label, "path": f"Keras → {exporter}", "export_s": seconds, **describe(bundle)})
        if exporter == "tf2onnx":
            mlp = models["seed MLP 784→64→10"]
            sm = work / "mlp_saved_model"
            mlp.export(str(sm), format="tf_saved_model", verbose=False)
            for label, src in (
                ("seed MLP, SavedModel", sm),
                ("seed MLP, TFLite fp32", km.to_tflite(mlp, work / "mlp.tflite")),
                ("seed MLP, TFLite int8", km.to_tflite(mlp, work / "mlp_int8.tflite", int8=True)),
            ):
                t = time.perf_counter()
                bundle = convert(src, work / f"{src.stem}-bundle")
                rows.append(
                    {"model": label, "path": "tf2onnx", "export_s": time.perf_counter() - t, **describe(bundle)}
                )
    lines = [
        "# Keras/TensorFlow/TFLite → ONNX: tf2onnx vs Keras 3 `model.export`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"Python {platform.python_version()}, onnxruntime {ort.__version__}. "
        f"Command: `.venv/bin/python benchmarks/keras_export.py`.",
        "",
        "export s: median of 5 exports (Keras rows: export only; SavedModel/TFLite rows: the whole import incl. "
        "parity, one run). max err: the parity proof's largest |onnx − source| over its cases "
        "(generated inputs, batch 1 and 3). ORT ms: median latency, 1 intra-op thread.",
        "",
        "| model | path | opset | export s | max err | nodes | ORT ms b=1 | ORT ms b=32 | ops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['path']} | {r['opset']} | {r['export_s']:.3f} | {r['max_err']:.2g} | {r['nodes']} "
            f"| {r['b1_ms']:.4f} | {r['b32_ms']:.4f} | {r['ops']} |"
        )
    text = "\n".join(lines) + "\n" + CHOICE
    print(text)
    out = ROOT / "benchmarks" / "results" / "keras-export.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
