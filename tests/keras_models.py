"""Keras models for the importer tests: the seed's MLP and conv pair, and models that carry code.

``CUSTOM_OBJECTS`` is what ``--custom-objects tests.keras_models:CUSTOM_OBJECTS`` names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf


class Scale(keras.layers.Layer):  # type: ignore[misc]
    """A custom layer deliberately not registered with Keras: loading it needs custom_objects."""

    def __init__(self, factor: float = 3.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x: Any) -> Any:
        return x * self.factor

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}


CUSTOM_OBJECTS = {"Scale": Scale}


def digits_784(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """load_digits (8×8) upsampled to 28×28 and flattened to 784 features in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images[:n].astype(np.float32) / 16.0
    big = np.kron(images, np.ones((3, 3), np.float32))  # 24×24
    big = np.pad(big, ((0, 0), (2, 2), (2, 2)))  # 28×28
    return big.reshape(len(big), 784), digits.target[:n].astype(np.int64)


def seed_mlp() -> Any:
    """The seed's MLP, Dense(64, relu) → Dense(10, softmax) on 784 inputs, trained for one epoch."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((784,), name="pixels"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="seed_mlp",
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = digits_784()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    return model


def seed_conv_pair() -> Any:
    """The seed's convolution pair: Conv2D(64, 3×3, same) → Conv2D(32, 1×1, same)."""
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), name="image"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 1, padding="same", name="features"),
        ],
        name="seed_conv_pair",
    )


def custom_layer_model() -> Any:
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [keras.Input((4,), name="x"), Scale(2.5), keras.layers.Dense(3, name="y")], name="custom_layer"
    )


def lambda_model() -> Any:
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [keras.Input((4,), name="x"), keras.layers.Lambda(lambda t: t * 2.0 + 1.0), keras.layers.Dense(3, name="y")],
        name="with_lambda",
    )


def save(model: Any, path: Path) -> Path:
    """model.save, quiet about Keras' Variable.__array__ lacking numpy 2's ``copy`` keyword (keras 3.15)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"__array__ implementation doesn't accept a copy", category=DeprecationWarning
        )
        model.save(path)
    return path


def to_tflite(model: Any, path: Path, *, int8: bool = False, int8_io: bool = False) -> Path:
    """Write a TFLite file; ``int8`` quantizes weights and activations with a digits calibration set."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        x, _ = digits_784(64)

        def calibration() -> Iterator[list[np.ndarray]]:
            for row in x:
                yield [row[None, :]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # The converter warns about unspecified input statistics for int8 io; calibration sets them.
        warnings.simplefilter("ignore", UserWarning)
        path.write_bytes(converter.convert())
    return path
