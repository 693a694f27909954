"""Robust accuracy: how a classifier holds up under small perturbations of its held-out inputs.

One :class:`AttackSet` is prepared per build from the evaluation data: a few hundred rows, their labels,
the inputs' range and ε as fractions of it. With a torch source, FGSM and PGD examples are crafted once on
the source module (white-box) and sent to every candidate (transfer); the gradient-free checks (uniform and
gaussian noise, SimBA) attack each candidate's own session, so they need nothing but the bundle. Accuracy
is the fraction of the rows classified as their label: a row already wrong when clean counts as wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import Field

from slipstream.artifact.hashing import sha256_json
from slipstream.data.datasets import arrays_digest
from slipstream.evaluate.attacks import Predict, fgsm, gaussian_noise, pgd, simba, uniform_noise
from slipstream.frozen import Frozen

AttackName = Literal["fgsm", "pgd", "uniform", "gaussian", "simba"]
GRADIENT_ATTACKS: tuple[AttackName, ...] = ("fgsm", "pgd")
GRADIENT_FREE: tuple[AttackName, ...] = ("uniform", "gaussian", "simba")


class RobustnessConfig(Frozen):
    """The recipe's ``robustness:`` section."""

    enabled: bool = Field(default=True, description="Measure robust accuracy for every candidate.")
    eps_of_range: tuple[float, ...] = Field(
        default=(0.02, 0.05),
        min_length=1,
        description="Perturbation sizes ε (L∞), as fractions of the evaluation inputs' range (max - min).",
    )
    examples: int = Field(default=256, ge=1, le=100_000, description="Evaluation rows attacked (the first ones).")
    pgd_steps: int = Field(default=10, ge=1, le=1000, description="PGD iterations (step size 2.5·ε/steps).")
    simba_steps: int = Field(
        default=32, ge=1, le=100_000, description="SimBA coordinates tried per row (each costs one or two queries)."
    )


class AttackAccuracy(Frozen):
    attack: AttackName
    eps_of_range: float = Field(description="ε as a fraction of the inputs' range.")
    eps: float = Field(description="ε in input units.")
    accuracy: float = Field(description="Accuracy on the perturbed rows.")
    transfer: bool = Field(description="Crafted on the source model and sent to this one (not attacked directly).")
    queries: int | None = Field(default=None, description="Rows this model answered for a black-box attack.")


class CandidateRobustness(Frozen):
    clean_accuracy: float | None = Field(description="Accuracy on the same rows, unperturbed (None: not measured).")
    results: tuple[AttackAccuracy, ...] = ()
    duration_s: float = Field(default=0.0, description="Wall time of this candidate's attacks and evaluations.")
    error: str | None = Field(default=None, description="Why it could not be measured, when it could not.")

    def accuracy(self, attack: str, eps_of_range: float) -> float | None:
        return next((r.accuracy for r in self.results if r.attack == attack and r.eps_of_range == eps_of_range), None)


class RobustnessSummary(Frozen):
    """What the build measured, on which rows, at what cost (or why it measured nothing)."""

    status: Literal["measured", "not applicable", "disabled", "failed"]
    reason: str | None = Field(default=None, description="Why nothing was measured, when nothing was.")
    examples: int = 0
    labels: Literal["data", "baseline predictions", "none"] = "none"
    input_range: tuple[float, float] | None = Field(default=None, description="Clip range of the perturbed inputs.")
    eps_of_range: tuple[float, ...] = ()
    eps: tuple[float, ...] = Field(default=(), description="ε in input units, in the order of eps_of_range.")
    pgd_steps: int = 0
    simba_steps: int = 0
    gradient_source: str | None = Field(default=None, description="Where FGSM/PGD gradients came from, if anywhere.")
    gradient_note: str | None = Field(default=None, description="Why there are no gradient attacks, when none.")
    source_accuracy: tuple[AttackAccuracy, ...] = Field(
        default=(), description="The source module's own (white-box) accuracy on the crafted rows."
    )
    craft_s: float = Field(default=0.0, description="Seconds spent crafting FGSM/PGD examples on the source.")
    duration_s: float = Field(default=0.0, description="Seconds the whole robustness stage took (cache hits: ~0).")


@dataclass(frozen=True)
class AttackSet:
    """The rows every candidate is attacked on, and the examples crafted on the source (transfer)."""

    input_name: str
    clean: np.ndarray
    labels: np.ndarray
    label_source: Literal["data", "baseline predictions"]
    low: float
    high: float
    config: RobustnessConfig
    seed: int
    crafted: Mapping[tuple[str, float], np.ndarray] = field(default_factory=dict)

    @property
    def eps(self) -> tuple[float, ...]:
        return tuple(f * (self.high - self.low) for f in self.config.eps_of_range)

    def digest(self) -> str:
        arrays = {"clean": self.clean, "labels": self.labels}
        arrays.update({f"{name}@{frac}": v for (name, frac), v in self.crafted.items()})
        return sha256_json([arrays_digest(arrays), self.config.model_dump(mode="json"), self.seed, self.low, self.high])


def prepare(
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
    predict: Predict,
    config: RobustnessConfig,
    seed: int,
    value_range: tuple[float, float] | None = None,
) -> AttackSet | str:
    """The attack rows, or why robust accuracy does not apply to this model (a sentence)."""
    if len(inputs) != 1:
        return f"robust accuracy is measured on single-input models; this one has inputs {sorted(inputs)}"
    ((name, data),) = inputs.items()
    if not np.issubdtype(data.dtype, np.floating):
        return f"input '{name}' is {data.dtype}, not floating point: small perturbations of it are not defined"
    rows = np.ascontiguousarray(data[: config.examples])
    scores = predict(rows)
    if scores.ndim != 2 or scores.shape[1] < 2:
        return f"the first output has shape {list(scores.shape)}, not class scores [rows, classes]"
    low, high = value_range if value_range is not None else (float(data.min()), float(data.max()))
    if not high > low:
        return f"input '{name}' is constant ({low}) in the evaluation data, so ε as a fraction of its range is 0"
    classes = scores.shape[1]
    given = None if labels is None else np.asarray(labels[: config.examples]).reshape(-1)
    usable = given is not None and len(given) == len(rows) and np.issubdtype(given.dtype, np.integer)
    if usable and given is not None and given.min() >= 0 and given.max() < classes:
        return AttackSet(name, rows, given.astype(np.int64), "data", low, high, config, seed)
    return AttackSet(name, rows, scores.argmax(-1).astype(np.int64), "baseline predictions", low, high, config, seed)


def craft(attack_set: AttackSet, module: Any, threads: int) -> tuple[AttackSet, tuple[AttackAccuracy, ...]]:
    """FGSM and PGD examples on a torch ``module`` at every ε, and the module's own accuracy on them."""
    import torch

    before, was_training = torch.get_num_threads(), module.training
    torch.set_num_threads(threads)
    module.eval()
    try:
        x = attack_set.clean.astype(np.float32)
        crafted: dict[tuple[str, float], np.ndarray] = {}
        source: list[AttackAccuracy] = []
        for frac, eps in zip(attack_set.config.eps_of_range, attack_set.eps, strict=True):
            args = (module, x, attack_set.labels, eps, attack_set.low, attack_set.high)
            pairs: tuple[tuple[AttackName, np.ndarray], ...] = (
                ("fgsm", fgsm(*args)),
                ("pgd", pgd(*args, steps=attack_set.config.pgd_steps)),
            )
            for attack, made in pairs:
                crafted[(attack, frac)] = made.astype(attack_set.clean.dtype)
                with torch.inference_mode():
                    out = module(torch.from_numpy(made))
                scores = (out[0] if isinstance(out, tuple | list) else out).numpy()
                source.append(_result(attack, frac, eps, scores, attack_set.labels, transfer=False))
    finally:
        torch.set_num_threads(before)
        module.train(was_training)
    return replace(attack_set, crafted=crafted), tuple(source)


def _result(
    attack: AttackName, frac: float, eps: float, scores: np.ndarray, labels: np.ndarray, **kw: Any
) -> AttackAccuracy:
    return AttackAccuracy(attack=attack, eps_of_range=frac, eps=eps, accuracy=_accuracy(scores, labels), **kw)


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(scores.argmax(-1) == labels))


def evaluate(predict: Predict, attack_set: AttackSet) -> CandidateRobustness:
    """Clean accuracy, the crafted (transfer) examples, then noise and SimBA on ``predict`` itself."""
    started = time.perf_counter()
    s = attack_set
    labels = s.labels
    clean = _accuracy(predict(s.clean), labels)
    results: list[AttackAccuracy] = []
    for i, (frac, eps) in enumerate(zip(s.config.eps_of_range, s.eps, strict=True)):
        for attack in GRADIENT_ATTACKS:
            if (attack, frac) in s.crafted:
                results.append(_result(attack, frac, eps, predict(s.crafted[(attack, frac)]), labels, transfer=True))
        noises: tuple[tuple[AttackName, Callable[..., np.ndarray]], ...] = (
            ("uniform", uniform_noise),
            ("gaussian", gaussian_noise),
        )
        for j, (attack, noise) in enumerate(noises):
            rng = np.random.default_rng([s.seed, i, j])  # the same noise for every candidate
            made = noise(s.clean, eps, s.low, s.high, rng)
            results.append(_result(attack, frac, eps, predict(made), labels, transfer=False))
        rng = np.random.default_rng([s.seed, i, 99])
        made, queries = simba(predict, s.clean, labels, eps, s.low, s.high, steps=s.config.simba_steps, rng=rng)
        results.append(_result("simba", frac, eps, predict(made), labels, transfer=False, queries=queries))
    return CandidateRobustness(clean_accuracy=clean, results=tuple(results), duration_s=time.perf_counter() - started)


def worst_drop(
    base: CandidateRobustness, cand: CandidateRobustness, *, relative: bool
) -> tuple[float, AttackAccuracy] | None:
    """The largest loss of robust accuracy against the baseline over every attack and ε both have (None: none)."""
    worst: tuple[float, AttackAccuracy] | None = None
    for r in cand.results:
        before = base.accuracy(r.attack, r.eps_of_range)
        if before is None:
            continue
        drop = before - r.accuracy
        drop = drop / abs(before) if relative and before else drop
        if worst is None or drop > worst[0]:
            worst = (drop, r)
    return worst
