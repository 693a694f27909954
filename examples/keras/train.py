"""The seed's two Keras models, saved as .keras files, plus the example's evaluation data.

    .venv/bin/python examples/keras/train.py [--out build-output/keras] [--epochs 10]

Writes into OUT:
  mlp.keras        Dense(64, relu) → Dense(10, softmax) on 784 pixels: scikit-learn's 8×8 digits upsampled
                   to 28×28 (the MNIST layout), trained on 70 % of the digits
  mlp_eval.npz     the held-out 30 %: `pixels` (float32 [n, 784]) and `labels`
  conv.keras       Conv2D(64, 3×3, same, relu) → Conv2D(32, 1×1, same) on 28×28×1 images (untrained
                   weights: it is a speed model, judged by fidelity to itself)
  conv_eval.npz    the held-out digits as `image` (float32 [n, 28, 28, 1]); no labels (the metric is cosine)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SEED = 0


def digits_28() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as 28×28 images in [0, 1] (each pixel repeated 3×3, then padded by 2), and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images.astype(np.float32) / 16.0, np.ones((3, 3), np.float32))  # 24×24
    return np.pad(images, ((0, 0), (2, 2), (2, 2))), digits.target.astype(np.int64)


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out images with labels, the same on every run."""
    from sklearn.model_selection import train_test_split

    x, y = digits_28()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    return x_train, y_train, x_test, y_test


def mlp(epochs: int) -> object:
    import keras

    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [
            keras.Input((784,), name="pixels"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="seed_mlp",
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x_train, y_train, _, _ = split()
    model.fit(x_train.reshape(len(x_train), 784), y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def conv_pair() -> object:
    import keras

    keras.utils.set_random_seed(SEED + 1)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), name="image"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 1, padding="same", name="features"),
        ],
        name="seed_conv_pair",
    )


def train(out: Path, epochs: int = 10) -> float:
    """Write both models and their evaluation data into ``out``; returns the MLP's held-out accuracy."""
    out.mkdir(parents=True, exist_ok=True)
    _, _, x_test, y_test = split()
    model = mlp(epochs)
    model.save(out / "mlp.keras")  # type: ignore[attr-defined]
    pixels = x_test.reshape(len(x_test), 784)
    np.savez(out / "mlp_eval.npz", pixels=pixels, labels=y_test)
    conv_pair().save(out / "conv.keras")  # type: ignore[attr-defined]
    np.savez(out / "conv_eval.npz", image=x_test[..., None])
    probabilities = model.predict(pixels, verbose=0)  # type: ignore[attr-defined]
    return float((probabilities.argmax(1) == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build-output/keras"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    accuracy = train(args.out, args.epochs)
    print(
        f"MLP held-out accuracy {accuracy:.4f}; wrote mlp.keras, mlp_eval.npz, conv.keras, conv_eval.npz in {args.out}"
    )


if __name__ == "__main__":
    main()
