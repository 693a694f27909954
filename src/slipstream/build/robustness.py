"""The build's robustness stage: robust accuracy for the baseline and every measured candidate.

Runs after the candidates are measured and before selection (``budget.max_robust_accuracy_drop`` needs it).
Sessions are built here, in the build's process, only for bundles that already loaded and ran in a child
process at the same graph-optimization level (as the side-by-side re-timing does). A candidate whose
attacks fail is recorded with the error; the build goes on. Results are cached by the model's content and
the attack rows' digest, like every measurement.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.build.measure import Measurer
from slipstream.build.record import CandidateResult
from slipstream.build.torch_source import TorchSourceContext
from slipstream.errors import SlipstreamError
from slipstream.evaluate.attacks import Predict
from slipstream.evaluate.robust import (
    AttackAccuracy,
    AttackSet,
    CandidateRobustness,
    RobustnessSummary,
    craft,
    evaluate,
    prepare,
)
from slipstream.runtime.base import EngineBase

ROBUST_VERSION = 1
CACHE_PREFIX = "robust:"
_CHUNK = 256


def session_predict(engine: EngineBase) -> Predict:
    """Class scores from ``engine`` for rows of its single input, in chunks that respect a fixed batch size: its
    first two-dimensional floating-point output (scikit-learn classifiers put the label first, then the
    probabilities), else its first output."""
    spec = engine.inputs[0]
    scores = [o.name for o in engine.outputs if len(o.shape) == 2 and o.dtype.startswith("float")]
    out = scores[0] if scores else engine.outputs[0].name
    fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
    chunk = fixed or _CHUNK

    def predict(x: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            n = len(part)
            if fixed is not None and n < fixed:
                part = np.concatenate([part, np.repeat(part[-1:], fixed - n, axis=0)])
            parts.append(np.asarray(engine.run({spec.name: part}, [out])[out])[:n])
        return np.concatenate(parts)

    return predict


def _text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SlipstreamError) else f"{type(exc).__name__}: {exc}"


def _gradient_note(framework: str, has_torch: bool) -> str | None:
    if has_torch:
        return None
    if framework in {"keras", "tensorflow"}:
        return (
            f"source framework '{framework}': FGSM/PGD through TensorFlow is not done yet; "
            "the gradient-free checks (noise, SimBA) cover this build"
        )
    return (
        f"source framework '{framework}' gives no gradients (FGSM/PGD need a single-input torch source); "
        "the gradient-free checks (noise, SimBA) cover this build"
    )


def measure_robustness(
    measurer: Measurer,
    baseline_bundle: Bundle,
    baseline: CandidateResult,
    candidates: list[CandidateResult],
    torch_ctx: TorchSourceContext | None,
) -> tuple[RobustnessSummary, CandidateResult, list[CandidateResult]]:
    """The run's robustness summary, and the baseline and candidates with their robust accuracy."""
    started = time.perf_counter()
    recipe = measurer.recipe
    config = recipe.robustness
    if not config.enabled:
        return RobustnessSummary(status="disabled", reason="robustness.enabled is false"), baseline, candidates
    spec = baseline_bundle.manifest.inputs[0]
    try:
        base_predict = session_predict(measurer.engine(baseline_bundle, baseline.graph_optimization))
        prepared = prepare(
            measurer.dataset.inputs, measurer.dataset.labels, base_predict, config, recipe.seed, spec.value_range
        )
    except Exception as exc:  # recorded in the run; the build goes on without robust accuracy
        summary = RobustnessSummary(status="failed", reason=_text(exc), duration_s=time.perf_counter() - started)
        return summary, baseline, candidates
    if isinstance(prepared, str):
        summary = RobustnessSummary(status="not applicable", reason=prepared, duration_s=time.perf_counter() - started)
        return summary, baseline, candidates
    attack_set: AttackSet = prepared
    source: tuple[AttackAccuracy, ...] = ()
    craft_s = 0.0
    note = _gradient_note(baseline_bundle.manifest.source.framework, torch_ctx is not None)
    if torch_ctx is not None:
        t0 = time.perf_counter()
        try:
            # One thread: the crafted rows are then the same on every machine (their digest keys the cache),
            # and a few hundred rows craft faster on one thread than on two busy ones (1.5 s against 6.2 s here).
            attack_set, source = craft(attack_set, torch_ctx.model.module, threads=1)
        except Exception as exc:  # the gradient-free checks still run; the note says why FGSM/PGD are missing
            note = f"crafting FGSM/PGD on the torch source failed: {_text(exc)}"
        craft_s = time.perf_counter() - t0
    digest = attack_set.digest()

    def measure(result: CandidateResult, bundle: Bundle, predict: Predict | None = None) -> CandidateResult:
        key = CACHE_PREFIX + sha256_json([measurer.key(bundle), digest, result.graph_optimization, ROBUST_VERSION])
        if key in measurer.cache:
            return result.model_copy(update={"robustness": CandidateRobustness.model_validate(measurer.cache[key])})
        t0 = time.perf_counter()
        try:
            fn = predict or session_predict(measurer.engine(bundle, result.graph_optimization))
            robust = evaluate(fn, attack_set)
        except Exception as exc:  # recorded on the candidate; the build goes on
            robust = CandidateRobustness(clean_accuracy=None, error=_text(exc), duration_s=time.perf_counter() - t0)
            return result.model_copy(update={"robustness": robust})
        measurer.remember(key, robust.model_dump(mode="json"))
        return result.model_copy(update={"robustness": robust})

    baseline = measure(baseline, baseline_bundle, base_predict)
    done: dict[str, CandidateResult] = {baseline.name: baseline}
    out: list[CandidateResult] = []
    for cand in candidates:
        if cand.status != "ok" or cand.bundle is None:
            out.append(cand)
            continue
        twin = done.get(cand.same_as or "")
        measured = (
            cand.model_copy(update={"robustness": twin.robustness})
            if twin is not None
            else measure(cand, Bundle.load(Path(cand.bundle)))
        )
        done[cand.name] = measured
        out.append(measured)
    summary = RobustnessSummary(
        status="measured",
        examples=len(attack_set.labels),
        labels=attack_set.label_source,
        input_range=(attack_set.low, attack_set.high),
        eps_of_range=config.eps_of_range,
        eps=attack_set.eps,
        pgd_steps=config.pgd_steps if source else 0,
        simba_steps=config.simba_steps,
        gradient_source="torch (the source module, white-box; candidates get the examples by transfer)"
        if source
        else None,
        gradient_note=note,
        source_accuracy=tuple(source),
        craft_s=craft_s,
        duration_s=time.perf_counter() - started,
    )
    return summary, baseline, out
