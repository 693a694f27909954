"""TFLite flatbuffer → bundle through tf2onnx's TFLite path, proven against ``tf.lite.Interpreter``.

The interpreter is resized to each parity case's shapes; where a model refuses resizing, the case runs
row by row at its exported batch of 1. For a quantized model the float outputs are compared within two
quantization steps of the int8 tensor they are dequantized from (integer outputs stay exact).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Unpack

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_file
from slipstream.errors import InvalidModelError
from slipstream.importers.finish import ImportJob, finish_import
from slipstream.importers.framing import Framing, ImportFraming
from slipstream.importers.keras import (
    DEFAULT_OPSET,
    converted,
    load_tensorflow,
    name_batch_dims,
    reject_unsupported_ops,
    rename_tensors,
)
from slipstream.importers.parity import Reference

# A quantized model's float output may differ from the interpreter by this many steps of its scale:
# TFLite requantizes with fixed-point multipliers, onnxruntime with float Quantize/Dequantize.
QUANT_STEPS = 2.0


@contextmanager
def _no_interpreter_deprecation() -> Iterator[None]:
    """tf.lite.Interpreter warns that it moves to ai_edge_litert; it is what TF 2.21 ships. tf2onnx opens one
    too and, if that raises (as the warning does under -W error), silently falls back to less exact shapes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated", category=UserWarning)
        yield


def open_interpreter(path: Path) -> Any:
    tf, _ = load_tensorflow()
    with _no_interpreter_deprecation():
        try:
            return tf.lite.Interpreter(model_path=str(path), num_threads=1)
        except Exception as exc:  # ValueError for a bad flatbuffer, RuntimeError for unsupported ops
            raise InvalidModelError(
                f"'{path}' is not a loadable TFLite model: {str(exc).strip().splitlines()[0]}",
                source=str(path),
                hint="Check the file; re-create it with tf.lite.TFLiteConverter.",
            ) from exc


def _io_names(interp: Any) -> tuple[dict[str, str], dict[str, str], str | None]:
    """Tensor name → signature name for inputs and outputs, and the signature key (None if none)."""
    signatures = interp.get_signature_list()
    if not signatures:
        return {}, {}, None
    key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
    runner = interp.get_signature_runner(key)
    ins = {d["name"]: k for k, d in runner.get_input_details().items()}
    outs = {d["name"]: k for k, d in runner.get_output_details().items()}
    return ins, outs, key


def interpreter_reference(path: Path, rename_in: Mapping[str, str], rename_out: Mapping[str, str]) -> Reference:
    """Run the interpreter on named feeds (resized per batch, or row by row if it cannot be resized)."""
    interp = open_interpreter(path)
    by_in = {rename_in.get(d["name"], d["name"]): d for d in interp.get_input_details()}
    outs = [(rename_out.get(d["name"], d["name"]), d["index"]) for d in interp.get_output_details()]

    def invoke(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, arr in feeds.items():
            interp.resize_tensor_input(by_in[name]["index"], list(arr.shape), strict=True)
        interp.allocate_tensors()
        for name, arr in feeds.items():
            interp.set_tensor(by_in[name]["index"], np.ascontiguousarray(arr))
        interp.invoke()
        return {name: interp.get_tensor(index).copy() for name, index in outs}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return invoke(feeds)
        except (RuntimeError, ValueError):
            rows = [invoke({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(len(next(iter(feeds.values()))))]
            return {name: np.concatenate([r[name] for r in rows]) for name, _ in outs}

    return run


def quantization_tolerances(interp: Any) -> dict[str, tuple[float, float]] | None:
    """For a quantized model: atol = QUANT_STEPS × the scale each float output is dequantized from."""
    tensors = {d["index"]: d for d in interp.get_tensor_details()}
    scales = {i: float(np.max(d["quantization_parameters"]["scales"], initial=0.0)) for i, d in tensors.items()}
    if not any(scales.values()):
        return None
    producers = {o: op for op in interp._get_ops_details() for o in op["outputs"]}
    steps = []
    for detail in interp.get_output_details():
        op = producers.get(detail["index"])
        if detail["dtype"] == np.float32 and op is not None and op["op_name"] == "DEQUANTIZE":
            steps.append(scales.get(int(op["inputs"][0]), 0.0))
    # Fallback when the output's producer is not a plain DEQUANTIZE: the coarsest scale in the model.
    step = max(steps) if steps and max(steps) > 0 else max(scales.values())
    # Integer outputs (int8 io models) may differ by a rounding step between the two runtimes.
    return {"float32": (QUANT_STEPS * step, 0.0), "int8": (1.0, 0.0), "uint8": (1.0, 0.0)}


def import_tflite(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    **framing: Unpack[ImportFraming],
) -> Bundle:
    """Make a bundle from a ``.tflite`` file; io tensors take the names of its serving signature."""
    frame = Framing.begin(framing, default_opset=DEFAULT_OPSET)
    tf, tf2onnx = load_tensorflow()
    src = Path(path)
    if not src.is_file():
        raise InvalidModelError(f"Expected a TFLite model file at '{src}', but there is no such file.", source=str(src))
    interp = open_interpreter(src)
    rename_in, rename_out, signature = _io_names(interp)
    tolerances = quantization_tolerances(interp)

    def convert() -> Any:
        with _no_interpreter_deprecation():
            return tf2onnx.convert.from_tflite(str(src), opset=frame.opset)[0]

    proto = converted(convert, str(src), failure=f"tf2onnx could not convert '{src}'")
    reject_unsupported_ops(proto, str(src))
    rename_tensors(proto, {**rename_in, **rename_out})
    name_batch_dims(proto)
    job = ImportJob(
        framework="tflite", step_name="import.tflite@1", default_name=src.stem,
        source_path=str(src), source_sha256=sha256_file(src),
        resolved={"exporter": "tf2onnx", "signature": signature, "quantized": tolerances is not None,
                  "parity_tolerances": {k: list(v) for k, v in (tolerances or {}).items()},
                  "tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__},
        step_config={"opset": frame.opset},
    )  # fmt: skip
    return finish_import(
        proto, output, job, frame, reference=interpreter_reference(src, rename_in, rename_out),
        reference_name="tf.lite.Interpreter", tolerances=tolerances,
    )  # fmt: skip
