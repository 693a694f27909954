"""Small-perturbation attacks under an L∞ bound: FGSM and PGD through a torch module's gradients, and
gradient-free ones (uniform and gaussian noise, SimBA) through any predict function, an ONNX session included.

Written here rather than taken from a library: torchattacks 3.5.1 pins ``requests~=2.25.1`` (it conflicts
with our pins), and the Adversarial Robustness Toolbox 1.20.1, which installs cleanly and gave the same
robust accuracies on the digits CNN, took 5.8 s to import and ran about 4× slower on that model. FGSM and
PGD are the textbook updates (Goodfellow et al. 2015; Madry et al. 2018); SimBA is the pixel-basis variant of
Guo et al. 2019, whose steps of ±ε on distinct pixels stay inside the same L∞ ball.

Every attack keeps its examples inside ``[low, high]`` (the inputs' valid range) and within ε of the clean
inputs in every element. Labels are class indices; a model's outputs are scores ``[rows, classes]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


def _project(x: Any, clean: Any, eps: float, low: float, high: float) -> Any:
    """Back into the ε-ball around ``clean`` and into the valid range (numpy arrays or torch tensors)."""
    return (x.clip(clean - eps, clean + eps) if isinstance(x, np.ndarray) else x.clamp(clean - eps, clean + eps)).clip(
        low, high
    )


def _scores(module: Any, x: Any) -> Any:
    out = module(x)
    return out[0] if isinstance(out, tuple | list) else out


def fgsm(module: Any, x: np.ndarray, labels: np.ndarray, eps: float, low: float, high: float) -> np.ndarray:
    """One step of size ε along the sign of the loss gradient (cross-entropy on the module's scores)."""
    import torch

    clean = torch.from_numpy(np.ascontiguousarray(x))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return np.asarray(_project(clean + eps * _loss_grad(module, clean, y).sign(), clean, eps, low, high).numpy())


def pgd(
    module: Any, x: np.ndarray, labels: np.ndarray, eps: float, low: float, high: float, *, steps: int = 10
) -> np.ndarray:
    """``steps`` signed-gradient steps of 2.5·ε/steps, each projected back into the ε-ball, from the clean
    point (no random start, so a run is deterministic). Each example keeps the first iterate that fooled the
    module, so a later step cannot undo a success."""
    import torch

    clean = torch.from_numpy(np.ascontiguousarray(x))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    step = 2.5 * eps / steps
    adv, best = clean.clone(), clean.clone()
    fooled = torch.zeros(len(y), dtype=torch.bool)
    for _ in range(steps):
        adv = _project(adv + step * _loss_grad(module, adv, y).sign(), clean, eps, low, high)
        with torch.no_grad():
            now = (_scores(module, adv).argmax(-1) != y) & ~fooled
        best[now] = adv[now]
        fooled |= now
    best[~fooled] = adv[~fooled]
    return np.asarray(best.numpy())


def _loss_grad(module: Any, x: Any, y: Any) -> Any:
    import torch

    z = x.detach().clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(_scores(module, z), y)
    (grad,) = torch.autograd.grad(loss, z)
    return grad


def uniform_noise(x: np.ndarray, eps: float, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """Each element moved by U(-ε, ε)."""
    return np.asarray(_project(x + rng.uniform(-eps, eps, x.shape).astype(x.dtype), x, eps, low, high))


def gaussian_noise(x: np.ndarray, eps: float, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """Each element moved by N(0, (ε/2)²), cut at ±ε (so it stays in the same ball as every other attack)."""
    return np.asarray(_project(x + rng.normal(0.0, eps / 2, x.shape).astype(x.dtype), x, eps, low, high))


def _margin(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The true class's score minus the best other one: below zero, the example is misclassified."""
    rows = np.arange(len(labels))
    true = scores[rows, labels]
    others = scores.copy()
    others[rows, labels] = -np.inf
    return np.asarray(true - others.max(axis=-1))


def simba(
    predict: Predict,
    x: np.ndarray,
    labels: np.ndarray,
    eps: float,
    low: float,
    high: float,
    *,
    steps: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """SimBA on the pixel basis: for ``steps`` distinct elements in a random order, try -ε, then +ε, and keep a
    step when it lowers the true-class margin. An example stops once misclassified. Returns the examples and
    the number of rows sent to ``predict`` (the query cost)."""
    adv = x.copy()
    flat = adv.reshape(len(adv), -1)
    clean = x.reshape(len(x), -1)
    order = rng.permutation(flat.shape[1])[:steps]
    margin = _margin(predict(adv), labels)
    queries = len(adv)
    for index in order:
        active = np.flatnonzero(margin > 0)
        if len(active) == 0:
            break
        for sign in (-1.0, 1.0):
            trial = flat[active].copy()
            trial[:, index] = np.clip(clean[active, index] + sign * eps, low, high)
            got = _margin(predict(trial.reshape((len(active), *x.shape[1:]))), labels[active])
            queries += len(active)
            better = got < margin[active]
            flat[active[better]] = trial[better]
            margin[active[better]] = got[better]
            active = active[~better]
            if len(active) == 0:
                break
    return adv, queries
