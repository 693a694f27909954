"""The demo's model: a small CNN for scikit-learn's 8×8 digits, trained on first use (seconds), cached.

Needs the `torch` and `sklearn` extras. Entry points for slipstream:
  build()        -> the trained torch module (use as `model.py:build --input-shape batch,1,8,8`)
  train_data()   -> batches of {"pixels", "labels"} for fine-tuning and Taylor importance
  eval_data()    -> held-out batches of {"pixels", "labels"} for the accuracy budget
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SEED = 0
EPOCHS = 6


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(pixels))
        return logits


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1300], y[:1300], x[1300:], y[1300:]


def _batches(x: np.ndarray, y: np.ndarray, size: int = 256) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(x), size):
        yield {"pixels": x[i : i + size], "labels": y[i : i + size]}


def train_data() -> Iterator[dict[str, np.ndarray]]:
    x, y, _, _ = split()
    return _batches(x, y)


def eval_data() -> Iterator[dict[str, np.ndarray]]:
    _, _, x, y = split()
    return _batches(x, y)


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slipstream" / "examples"
    return root / f"digits_cnn-seed{SEED}-e{EPOCHS}.pt"


def build() -> nn.Module:
    """The trained model in eval mode (about 99 % accuracy on the held-out digits)."""
    model = DigitsCNN()
    cache = _cache_file()
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    torch.manual_seed(SEED)
    x, y, _, _ = split()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss: Any = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(cache)
    return model.eval()


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits (pixels [n, 1, 8, 8] in [0, 1], labels)."""
    _, _, x, y = split()
    return x, y
