"""ONNX file → bundle: check the model, infer shapes, read the io specs, write the bundle."""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.hashing import sha256_file
from slipstream.artifact.manifest import Manifest, Source
from slipstream.artifact.specs import graph_io_specs
from slipstream.errors import InvalidModelError
from slipstream.importers.input_ranges import with_graph_ranges

STEP_NAME = "import.onnx@1"


def load_onnx_file(path: Path) -> onnx.ModelProto:
    """Load an .onnx file with its external data, or fail with an error that says what is wrong."""
    if not path.is_file():
        raise InvalidModelError(
            f"Expected an ONNX model file at '{path}', but there is no such file.",
            source=str(path),
            hint="Check the path.",
        )
    try:
        return onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as exc:
        raise _missing_external_data(path, exc) from exc
    except onnx.checker.ValidationError as exc:
        # onnx reports a missing external-data file as a validation error ("is not regular file").
        if "should be stored in" not in str(exc):
            raise _unreadable(path, exc) from exc
        raise _missing_external_data(path, exc) from exc
    except Exception as exc:  # protobuf raises DecodeError and others with no common base
        raise _unreadable(path, exc) from exc


def _missing_external_data(path: Path, exc: Exception) -> InvalidModelError:
    return InvalidModelError(
        f"'{path}' refers to external data that is missing: {exc}.",
        source=str(path),
        hint="Keep the external data files next to the .onnx file, with the names it records.",
    )


def _unreadable(path: Path, exc: Exception) -> InvalidModelError:
    return InvalidModelError(
        f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {exc}).",
        source=str(path),
        hint="Re-export the model; a truncated download or a non-ONNX file gives this error.",
    )


def check_model(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Run the ONNX checker and shape inference; return the model with inferred shapes."""
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(
            f"'{source}' fails the ONNX checker: {str(exc).strip().splitlines()[0]}",
            source=source,
            hint="Fix the exporter settings or the graph; `python -m onnx.checker` shows the details.",
        ) from exc
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference raises InferenceError and plain RuntimeErrors
        raise InvalidModelError(
            f"Shape inference failed on '{source}': {str(exc).strip().splitlines()[0]}",
            source=source,
            hint="The graph has inconsistent shapes; re-export it with a current exporter.",
        ) from exc


def import_onnx(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str = "1",
    overwrite: bool = False,
) -> Bundle:
    """Make a bundle from an ONNX file (external data supported). The source file is untouched."""
    started = time.perf_counter()
    src = Path(path)
    model = check_model(load_onnx_file(src), str(src))
    inputs, outputs = graph_io_specs(model.graph)
    inputs = with_graph_ranges(inputs, model)
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    source_sha = sha256_file(src)
    manifest = Manifest(
        name=name or src.stem,
        version=version,
        source=Source(framework="onnx", path=str(src), sha256=source_sha),
        inputs=inputs,
        outputs=outputs,
        resolved={
            "opset": opsets.get("ai.onnx"),
            "opsets": dict(opsets),
            "ir_version": model.ir_version,
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
        },
    )
    step = Step(
        name=STEP_NAME,
        config={"source": str(src)},
        duration_s=time.perf_counter() - started,
        input_sha256=source_sha,
    )
    return write_bundle(output, model, manifest, step=step, overwrite=overwrite)
