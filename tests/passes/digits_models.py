"""Small real models: a CNN and an MLP trained briefly on sklearn's digits, exported by torch dynamo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); images scaled to [0, 1], shape [n, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def small_cnn() -> Any:
    """The demo's digits CNN (convs with batch norm, 10 classes): pruning must carry the norms along."""
    from slipstream.demo.digits import DigitsCNN

    return DigitsCNN()


def train_and_export(kind: str, path: Path, epochs: int = 8) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "cnn":
        model: nn.Module = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    else:
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    x_train, y_train, _, _ = digits_data()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    example = (torch.zeros(4, 1, 8, 8),)
    torch.onnx.export(
        model,
        example,
        str(path),
        dynamo=True,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=4096)}},
    )
    return path


def accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((np.argmax(logits, axis=1) == y).mean())
