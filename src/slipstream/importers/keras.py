"""Keras models (in memory, ``.keras``/``.h5`` files) and TensorFlow SavedModels → bundle, with a parity proof.

Conversion goes through tf2onnx: ``from_function`` on a ``tf.function`` that calls the Keras model with
``training=False`` and returns a dict keyed by the model's output names (so the ONNX outputs carry them),
and tf2onnx's SavedModel loader for a signature. Keras 3's own ``model.export(format="onnx")`` calls the
same tf2onnx function underneath; it is available as ``exporter="keras"`` (see
benchmarks/results/keras-export.md for the comparison and why tf2onnx is the default).

tensorflow, keras and tf2onnx are imported only inside these functions (extra ``tensorflow``).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, Unpack

import numpy as np
import onnx

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_file, sha256_json
from slipstream.errors import (
    ConfigError,
    ConversionError,
    InvalidModelError,
    MissingDependencyError,
    UnsupportedOpError,
    UntrustedPickleError,
)
from slipstream.importers.finish import ImportJob, finish_import
from slipstream.importers.framing import Framing, ImportFraming
from slipstream.importers.parity import Reference

DEFAULT_OPSET = 17
DEFAULT_SIGNATURE = "serving_default"
T = TypeVar("T")
Exporter = Literal["tf2onnx", "keras"]
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


def load_tensorflow() -> tuple[Any, Any]:
    """Import tensorflow and tf2onnx, or say which extra to install."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter off the console
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise MissingDependencyError(
            exc.name or "tensorflow", extra="tensorflow", feature="Converting Keras/TensorFlow/TFLite models"
        ) from exc
    return tf, tf2onnx


@contextmanager
def quiet_converter_logs() -> Iterator[None]:
    """tf2onnx and TF's v1 graph tools log deprecation notes on every conversion, and tf2onnx logs each op it
    cannot convert, which :func:`reject_unsupported_ops` reports in one error: keep them off the console."""
    loggers = [logging.getLogger(n) for n in ("tensorflow", "tf2onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def converted(convert: Callable[[], T], label: str, *, failure: str, hint: str = "Try another opset.") -> T:
    """Run one tf2onnx/Keras conversion with its logs kept quiet; whatever it raises becomes one ConversionError
    that says what failed (``failure``) and keeps the cause."""
    try:
        with quiet_converter_logs():
            return convert()
    except ConversionError:
        raise
    except Exception as exc:  # tf2onnx/keras raise many unrelated types
        raise ConversionError(f"{failure}: {type(exc).__name__}: {_first_line(exc)}", source=label, hint=hint) from exc


def is_saved_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "saved_model.pb").is_file()


def parse_custom_objects(spec: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``module:dict`` → the dict it names (importing the module runs its code: the user vouches for it)."""
    if spec is None or isinstance(spec, Mapping):
        return None if spec is None else dict(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"--custom-objects must look like 'module:dict'; got {spec!r}.",
            field="custom_objects",
            hint="Name an importable module and a dict in it, e.g. mypkg.layers:CUSTOM_OBJECTS.",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--custom-objects names module '{module_name}', which cannot be imported: {exc}.",
            field="custom_objects",
            hint="Put the module on PYTHONPATH (or install its package) and try again.",
        ) from exc
    objects = getattr(module, attr, None)
    if not isinstance(objects, Mapping):
        raise ConfigError(
            f"--custom-objects expected '{attr}' in '{module_name}' to be a dict of name → class; "
            f"got {type(objects).__name__}.",
            field="custom_objects",
            hint="Define e.g. CUSTOM_OBJECTS = {'MyLayer': MyLayer} in that module.",
        )
    return dict(objects)


def load_keras_file(path: Path, *, custom_objects: Mapping[str, Any] | None, trust_pickle: bool) -> Any:
    """Load a .keras/.h5 file; models that carry code load only when the user says they trust them."""
    load_tensorflow()
    import keras

    if not path.is_file():
        raise InvalidModelError(
            f"Expected a Keras model file at '{path}', but there is no such file.", source=str(path)
        )
    try:
        return keras.models.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=not trust_pickle)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise _unloadable(path, exc) from exc
        raise UntrustedPickleError(
            f"'{path}' contains a Lambda layer with Python bytecode; loading it would run that code, so Keras "
            "refuses it by default (safe_mode).",
            source=str(path),
            hint="If you trust where the file came from, pass --trust-pickle (trust_pickle=True).",
        ) from exc
    except TypeError as exc:
        # Keras raises TypeError ("could not be deserialized", "Could not locate class") for unknown classes.
        raise UntrustedPickleError(
            f"'{path}' uses custom objects (layers, activations...) whose code is not in the file, and none were "
            f"given to load them: {str(exc).strip().splitlines()[0]}",
            source=str(path),
            hint="Pass --custom-objects module:dict naming a dict of those classes (e.g. mypkg.layers:CUSTOM_OBJECTS). "
            "Importing that module runs its code: name only code you trust.",
        ) from exc
    except Exception as exc:  # zip/h5 errors have no common base
        raise _unloadable(path, exc) from exc


def _unloadable(path: Path, exc: Exception) -> InvalidModelError:
    return InvalidModelError(
        f"'{path}' is not a loadable Keras model ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}).",
        source=str(path),
        hint="Save it again with model.save('model.keras') in Keras 3.",
    )


def name_batch_dims(model: onnx.ModelProto) -> None:
    """tf2onnx names the dynamic batch axis 'unk__N', differently per tensor: call them all 'batch'."""
    graph = model.graph
    symbols = set()
    for info in (*graph.input, *graph.output):
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            symbols.add(dims[0].dim_param)
    for info in (*graph.input, *graph.output, *graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = "batch"


def reject_unsupported_ops(model: onnx.ModelProto, label: str) -> None:
    """tf2onnx keeps going past ops it cannot convert and leaves them in the graph: name them all."""
    known = {"", "ai.onnx", "ai.onnx.ml"}
    missing = Counter(
        n.op_type for n in model.graph.node if n.domain not in known or not onnx.defs.has(n.op_type, n.domain)
    )
    if missing:
        listing = ", ".join(f"{op} ×{count}" for op, count in missing.most_common())
        raise UnsupportedOpError(
            f"tf2onnx has no ONNX conversion for {len(missing)} op type(s) in {label}: {listing}.",
            op=missing.most_common(1)[0][0],
            source=label,
            hint="Replace those ops in the model (e.g. freeze variables into constants before making a TFLite "
            "file), or try another opset.",
        )


def rename_tensors(model: onnx.ModelProto, mapping: Mapping[str, str]) -> None:
    """Rename graph tensors (inputs/outputs named like 'serving_default_x:0' or 'Identity:0')."""
    if not mapping:
        return
    graph = model.graph
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for info in (*graph.input, *graph.output, *graph.value_info):
        info.name = mapping.get(info.name, info.name)


def _versions(tf: Any, tf2onnx: Any) -> dict[str, Any]:
    import keras

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}


def _keras_io(model: Any) -> tuple[list[Any], list[str]]:
    inputs = list(getattr(model, "inputs", None) or [])
    if not inputs:
        raise ConversionError(
            f"The Keras model {getattr(model, 'name', '')!r} has no defined inputs (a subclassed model that was "
            "never built on a keras.Input).",
            hint="Build it as a functional or Sequential model starting from keras.Input(shape=..., name=...).",
        )
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(model.outputs):
        names = (
            [model.layers[-1].name] if len(model.outputs) == 1 else [f"output_{i}" for i in range(len(model.outputs))]
        )
    return inputs, names


def _as_list(values: Any, n: int) -> list[Any]:
    if isinstance(values, Mapping):
        return list(values.values())
    if isinstance(values, list | tuple):
        return list(values)
    return [values] if n == 1 else list(values)


def export_keras(
    model: Any, *, exporter: Exporter = "tf2onnx", opset: int = DEFAULT_OPSET
) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Convert an in-memory Keras model; returns the ONNX model and its input and output names."""
    tf, tf2onnx = load_tensorflow()
    inputs, out_names = _keras_io(model)
    in_names = [t.name for t in inputs]
    signature = [tf.TensorSpec(t.shape, t.dtype, name=n) for t, n in zip(inputs, in_names, strict=True)]
    if exporter == "tf2onnx":

        def forward(*args: Any) -> dict[str, Any]:
            outs = model(args[0] if len(args) == 1 else list(args), training=False)
            return dict(zip(out_names, _as_list(outs, len(out_names)), strict=True))

        proto, _ = tf2onnx.convert.from_function(tf.function(forward), input_signature=signature, opset=opset)
        return proto, in_names, out_names
    # Keras refuses to export a model never called in this process (even one just loaded): call it once.
    example = [np.zeros([1, *t.shape[1:]], dtype=t.dtype) for t in inputs]
    model(example[0] if len(example) == 1 else example, training=False)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # keras' tf2onnx patch probes np.object, which numpy 2 answers with a FutureWarning.
        warnings.filterwarnings("ignore", message=r".*np\.object", category=FutureWarning)
        target = Path(tmp) / "model.onnx"
        model.export(str(target), format="onnx", opset_version=opset, verbose=False)
        proto = onnx.load(str(target))
    rename_tensors(proto, {o.name: n for o, n in zip(proto.graph.output, out_names, strict=True)})
    return proto, in_names, out_names


def keras_reference(model: Any, in_names: Sequence[str], out_names: Sequence[str]) -> Reference:
    """``model.predict`` on the named inputs, keyed by the ONNX output names."""

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [np.asarray(feeds[n]) for n in in_names]
        preds = model.predict(arrays[0] if len(arrays) == 1 else arrays, verbose=0)
        return dict(zip(out_names, (np.asarray(p) for p in _as_list(preds, len(out_names))), strict=True))

    return run


def import_keras(
    model: Any,
    output: str | os.PathLike[str],
    *,
    custom_objects: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    exporter: Exporter = "tf2onnx",
    **framing: Unpack[ImportFraming],
) -> Bundle:
    """Make a bundle from a Keras model object or a ``.keras``/``.h5`` file, proven against ``model.predict``.

    Files with Lambda layers load only with ``trust_pickle=True``; custom layers need ``custom_objects``
    (a dict, or ``"module:dict"`` naming one).
    """
    frame = Framing.begin(framing, default_opset=DEFAULT_OPSET)
    opset = frame.opset or DEFAULT_OPSET
    tf, tf2onnx = load_tensorflow()
    source_path: str | None = None
    source_sha: str | None = None
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        objects = parse_custom_objects(custom_objects)
        source_path, source_sha = str(path), sha256_file(path) if path.is_file() else None
        model = load_keras_file(path, custom_objects=objects, trust_pickle=trust_pickle)
        default_name, label = path.stem, str(path)
    else:
        default_name = str(getattr(model, "name", "") or "keras-model")
        label = f"keras model {default_name!r}"
    proto, in_names, out_names = converted(
        lambda: export_keras(model, exporter=exporter, opset=opset),
        label,
        failure=f"Converting {label} to ONNX with {exporter} failed",
        hint="Try the other exporter (exporter='keras' or 'tf2onnx'), or another opset.",
    )
    reject_unsupported_ops(proto, label)
    name_batch_dims(proto)
    job = ImportJob(
        framework="keras", step_name="import.keras@1", default_name=default_name,
        source_path=source_path, source_sha256=source_sha,
        resolved={"exporter": exporter, **_versions(tf, tf2onnx)},
        step_config={"exporter": exporter, "opset": opset, "trust_pickle": trust_pickle,
                     "custom_objects": custom_objects if isinstance(custom_objects, str) else None},
    )  # fmt: skip
    return finish_import(
        proto, output, job, frame, reference=keras_reference(model, in_names, out_names),
        reference_name="keras model.predict",
    )  # fmt: skip


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _dir_digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_json([[str(p.relative_to(path)), sha256_file(p)] for p in files])


def saved_model_reference(fn: Any, tf: Any) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = fn(**{k: tf.constant(v) for k, v in feeds.items()})
        return {k: np.asarray(v) for k, v in result.items()}

    return run


def import_saved_model(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    signature: str = DEFAULT_SIGNATURE,
    **framing: Unpack[ImportFraming],
) -> Bundle:
    """Make a bundle from one signature of a TensorFlow SavedModel, proven against that signature."""
    frame = Framing.begin(framing, default_opset=DEFAULT_OPSET)
    opset = frame.opset or DEFAULT_OPSET
    tf, tf2onnx = load_tensorflow()
    from tf2onnx import tf_loader

    src = Path(path)
    if not is_saved_model_dir(src):
        raise InvalidModelError(
            f"Expected a TensorFlow SavedModel directory (with saved_model.pb) at '{src}'.",
            source=str(src),
            hint="Point at the directory tf.saved_model.save or model.export(..., format='tf_saved_model') wrote.",
        )
    try:
        loaded = tf.saved_model.load(str(src))
    except Exception as exc:  # TF raises many unrelated types for a broken SavedModel
        raise InvalidModelError(f"'{src}' is not a loadable SavedModel: {exc}", source=str(src)) from exc
    signatures = dict(loaded.signatures)
    if signature not in signatures:
        raise ConfigError(
            f"The SavedModel at '{src}' has no signature {signature!r}; it has {sorted(signatures) or 'none'}.",
            field="signature",
            hint="Pass --signature with one of those names."
            if signatures
            else "Re-save it with a serving signature (tf.saved_model.save(..., signatures=...)).",
        )

    def convert() -> onnx.ModelProto:
        graph_def, ins, outs, renames = tf_loader.from_saved_model(
            str(src), None, None, tag="serve", signatures=[signature], return_tensors_to_rename=True
        )
        made: onnx.ModelProto = tf2onnx.convert.from_graph_def(
            graph_def, input_names=ins, output_names=outs, opset=opset, tensors_to_rename=renames
        )[0]
        return made

    proto = converted(convert, str(src), failure=f"tf2onnx could not convert signature {signature!r} of '{src}'")
    reject_unsupported_ops(proto, str(src))
    name_batch_dims(proto)
    job = ImportJob(
        framework="tensorflow", step_name="import.tensorflow@1", default_name=src.name,
        source_path=str(src), source_sha256=_dir_digest(src),
        resolved={"exporter": "tf2onnx", "signature": signature, **_versions(tf, tf2onnx)},
        step_config={"signature": signature, "opset": opset},
    )  # fmt: skip
    return finish_import(
        proto, output, job, frame, reference=saved_model_reference(signatures[signature], tf),
        reference_name=f"SavedModel signature {signature}",
    )  # fmt: skip
