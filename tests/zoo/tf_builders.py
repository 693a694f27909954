"""Zoo builders for Keras functional models and TFLite files (float and int8), made from tiny Keras models.
TensorFlow is imported by the first of these that runs, once per process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tests.zoo.base import Built, Expected, rng


def _keras() -> Any:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    return keras


def _keras_expected(model: Any, names: Sequence[str]) -> Expected:
    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        out = model([np.asarray(feeds[n]) for n in names] if len(names) > 1 else np.asarray(feeds[names[0]]))
        return [np.asarray(o) for o in (out if isinstance(out, list | tuple) else [out])]

    return run


def keras_two_inputs(_: Path) -> Built:
    """A functional model over two inputs (numbers and a small image), concatenated into one classifier."""
    keras = _keras()
    keras.utils.set_random_seed(10)
    numbers = keras.Input((6,), name="numbers")
    image = keras.Input((8, 8, 1), name="image")
    seen = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, activation="relu")(image))
    joined = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(numbers), seen])
    scores = keras.layers.Dense(4, activation="softmax", name="scores")(joined)
    model = keras.Model([numbers, image], scores, name="two_inputs")
    gen = rng(10)
    feeds = {"numbers": gen.standard_normal((2, 6), dtype=np.float32), "image": gen.random((2, 8, 8, 1), np.float32)}
    return Built(model, {}, feeds, _keras_expected(model, ["numbers", "image"]), atol=1e-5)


def keras_two_heads(_: Path) -> Built:
    """A functional model with two inputs and two outputs: a class and a regression head."""
    keras = _keras()
    keras.utils.set_random_seed(11)
    left, right = keras.Input((5,), name="left"), keras.Input((3,), name="right")
    hidden = keras.layers.Dense(16, activation="tanh")(keras.layers.Concatenate()([left, right]))
    kind = keras.layers.Dense(3, activation="softmax", name="kind")(hidden)
    amount = keras.layers.Dense(1, name="amount")(hidden)
    model = keras.Model([left, right], [kind, amount], name="two_heads")
    gen = rng(11)
    feeds = {
        "left": gen.standard_normal((2, 5), dtype=np.float32),
        "right": gen.standard_normal((2, 3), dtype=np.float32),
    }
    return Built(model, {}, feeds, _keras_expected(model, ["left", "right"]), outputs=("kind", "amount"), atol=1e-5)


def _tflite_mlp() -> Any:
    keras = _keras()
    keras.utils.set_random_seed(12)
    return keras.Sequential(
        [
            keras.Input((16,), name="features"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(4, name="logits"),
        ],
        name="tflite_mlp",
    )


def _interpreter_expected(path: Path) -> Expected:
    """The TFLite interpreter's own answer, one row at a time at the file's batch of 1 (as it was converted)."""

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter's move to ai_edge_litert
            interp = tf.lite.Interpreter(model_path=str(path), num_threads=1)
        interp.allocate_tensors()
        (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
        rows = []
        for row in np.asarray(next(iter(feeds.values()))):
            interp.set_tensor(inp["index"], row[None].astype(inp["dtype"]))
            interp.invoke()
            rows.append(interp.get_tensor(out["index"])[0])
        return [np.stack(rows)]

    return run


def _to_tflite(model: Any, path: Path, calibration: np.ndarray | None, *, int8_io: bool = False) -> Path:
    import warnings

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([row[None, :]] for row in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        path.write_bytes(converter.convert())
    return path


def tflite_float(work: Path) -> Built:
    path = _to_tflite(_tflite_mlp(), work / "float.tflite", None)
    feeds = {"features": rng(12).standard_normal((2, 16), dtype=np.float32)}
    return Built(path, {}, feeds, _interpreter_expected(path), atol=1e-5)


def tflite_int8(work: Path) -> Built:
    """Weights and activations int8 (float input and output), calibrated on 64 rows."""
    calibration = rng(13).standard_normal((64, 16), dtype=np.float32)
    path = _to_tflite(_tflite_mlp(), work / "int8.tflite", calibration)
    feeds = {"features": rng(12).standard_normal((2, 16), dtype=np.float32)}
    # onnxruntime requantizes with float arithmetic, TFLite with fixed-point: a couple of output steps apart.
    return Built(path, {}, feeds, _interpreter_expected(path), atol=0.05)


def tflite_int8_io(work: Path) -> Built:
    """int8 all the way, input and output included: the client quantizes its floats with the input's scale
    and zero point (which the bundle must record), as it would for the TFLite file itself."""
    import warnings

    import tensorflow as tf

    calibration = rng(13).standard_normal((64, 16), dtype=np.float32)
    path = _to_tflite(_tflite_mlp(), work / "int8-io.tflite", calibration, int8_io=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter's move to ai_edge_litert
        (details,) = tf.lite.Interpreter(model_path=str(path)).get_input_details()
    scale, zero_point = details["quantization"]
    real = rng(12).standard_normal((2, 16), dtype=np.float32)
    feeds = {"features": np.clip(np.round(real / scale) + zero_point, -128, 127).astype(np.int8)}
    # Integer outputs: within two steps of the interpreter's (fixed-point vs float requantization).
    return Built(path, {}, feeds, _interpreter_expected(path), atol=2.0, quantized_io=True)
