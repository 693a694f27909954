"""The build: import the source, try every candidate, measure each on the real target, select, report.

A failed candidate never aborts the build: each candidate's passes and measurement run in a child process
(build/isolate.py), so even a segfault in onnxruntime is recorded in run.json with its signal, and the build
goes on. run.json and the report are written whatever happens after the import, with what the build has.
Measurements of a bundle are cached by its content (model sha256, data, metric, batch size, target), so a
second run of the same recipe re-uses both the pass cache and the measurements; byte-identical candidates
are measured once. Every ratio in the headline is timed side by side (evaluate/sidebyside.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.build.ladder import auto_candidates, engine_skip
from slipstream.build.measure import Measurer, first_rows
from slipstream.build.package import package, tune
from slipstream.build.recipe import Candidate, Recipe, precheck_recipe_data
from slipstream.build.record import CandidateMetrics, CandidateResult, RunRecord, SensitivityReport
from slipstream.build.robustness import measure_robustness
from slipstream.build.select import quality_drop, runner_up, select
from slipstream.build.sensitivity import analyze_sensitivity
from slipstream.build.text_slim import training_steps
from slipstream.build.torch_source import (
    TorchSourceContext,
    is_bundle_dir,
    is_torch_chain,
    load_source_module,
    run_torch_candidate,
    skip_reason,
    source_ladder,
    torch_context,
    torch_eager_timing,
    torch_refusal,
)
from slipstream.data.datasets import Dataset, load_dataset
from slipstream.errors import ConfigError, EngineError, SlipstreamError
from slipstream.evaluate.metrics import Metric, get_metric
from slipstream.evaluate.sidebyside import ALTERNATING, SideBySide
from slipstream.runtime.choice import cpu_features, engine_key
from slipstream.runtime.targets import cpu_model, physical_cores, target

BASELINE = "baseline"


@dataclass(frozen=True)
class BuildEvent:
    """Progress: which stage, which candidate, and the best objective gain so far."""

    stage: str
    candidate: str | None = None
    index: int = 0
    total: int = 0
    best: str | None = None


@dataclass(frozen=True)
class BuildResult:
    record: RunRecord
    winner: Bundle
    output: Path


Progress = Callable[[BuildEvent], None]


def _pass_label(ref: str | dict[str, dict[str, Any]]) -> str:
    if isinstance(ref, str):
        return ref
    ((name, options),) = ref.items()
    return name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def _pass_ref(ref: str | dict[str, dict[str, Any]]) -> str | tuple[str, dict[str, Any]]:
    if isinstance(ref, str):
        return ref
    if len(ref) != 1:
        raise ConfigError(f"A pass must be 'name' or {{name: {{options}}}}; got {ref!r}.", field="candidates")
    ((name, options),) = ref.items()
    return (name, dict(options or {}))


def _write_calibration(recipe: Recipe, baseline: Bundle, eval_set: Dataset, dest: Path) -> Path:
    """Real inputs for static int8 calibration as an .npz (from data.calibration, else the eval data)."""
    source = eval_set
    if recipe.data.calibration is not None:
        source = load_dataset(recipe.data.calibration, baseline.manifest.inputs)
    rows = source.take(512).inputs
    if dest.is_file():
        with np.load(dest) as old:
            if set(old.files) == set(rows) and all(np.array_equal(old[k], v) for k, v in rows.items()):
                return dest  # unchanged: keep the file, so the pass cache keys stay the same
    np.savez(dest, **dict(rows))  # type: ignore[arg-type]  # numpy types allow_pickle in **kwds
    return dest


def _entry_point_module(recipe: Recipe) -> Any:
    """The torch module of a ``file.py:fn`` or transformers-folder source, loaded once per build (else None)."""
    return load_source_module(recipe.model)


def _source_bundle(recipe: Recipe, dest: Path, module: Any) -> Bundle:
    """The baseline bundle: the recipe's bundle as is, or its source converted by the pass runner (the
    ``import@1`` step, cached by the pass cache while the source is unchanged)."""
    if is_bundle_dir(recipe.model):  # a transformers model folder is converted like any source
        return Bundle.load(recipe.model)
    from slipstream.passes.export import import_source

    shapes = (recipe.input_shape,) if recipe.input_shape is not None else ()
    run = import_source(
        recipe.model, dest, name=recipe.name, module=module, input_shapes=shapes, dynamic_axes=recipe.dynamic_axes
    )
    return run.bundle


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "physical_cores": physical_cores(),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),  # what the engine x precision choice depends on (runtime/choice.py)
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from slipstream import __version__

    found = {"slipstream": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    for optional in ("openvino", "nncf"):
        if importlib.util.find_spec(optional) is not None:
            found[optional] = importlib.metadata.version(optional)
    return found


class _Run:
    """The record as far as the build got: written as run.json even when a later stage fails."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record


def run_build(recipe: Recipe, *, progress: Progress | None = None) -> BuildResult:
    """Run the whole build described by ``recipe``; see the module docstring."""
    started = time.perf_counter()
    notify = progress or (lambda event: None)
    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)
    metric = get_metric(recipe.metric)
    tgt = target(recipe.target)
    precheck_recipe_data(recipe, needs_labels=metric.against == "labels")  # before any conversion work

    notify(BuildEvent(stage="import"))
    module = _entry_point_module(recipe)
    baseline_bundle = _source_bundle(recipe, out / BASELINE, module)
    dataset = load_dataset(recipe.data.eval, baseline_bundle.manifest.inputs).take(recipe.max_eval_rows)
    if metric.against == "labels" and dataset.labels is None:
        raise ConfigError(
            f"Metric '{recipe.metric}' needs labels, but {recipe.data.eval} has none.",
            field="data.eval",
            hint="Add labels to the data, or use metric: cosine or agreement.",
        )
    calibration = _write_calibration(recipe, baseline_bundle, dataset, out / "calibration.npz")
    torch_ctx = torch_context(recipe, baseline_bundle, dataset, module)
    run = _Run(
        RunRecord(
            name=recipe.name,
            recipe=recipe.model_dump(mode="json"),
            recipe_sha256=sha256_json(recipe.model_dump(mode="json")),
            machine=_machine(),
            versions=_versions(),
            metric=recipe.metric,
            higher_is_better=metric.higher_is_better,
            objective=recipe.objective,
            batch_size=recipe.batch_size,
            baseline=CandidateResult(
                name=BASELINE, passes=(), status="failed", error="not measured", bundle=str(baseline_bundle.path)
            ),
            candidates=(),
        )
    )
    with tempfile.TemporaryDirectory(prefix=".children-", dir=out) as scratch:
        measurer = Measurer(recipe, dataset, metric, tgt, out / ".measurements.json", Path(scratch))
        try:
            winner = _search(run, recipe, baseline_bundle, measurer, torch_ctx, calibration, notify)
        except Exception as exc:  # write what the build has, then let the error reach the caller
            text = str(exc) if isinstance(exc, SlipstreamError) else f"{type(exc).__name__}: {exc}"
            _finish(run.record.model_copy(update={"error": text}), out, started, notify)
            raise
    record = _finish(run.record, out, started, notify)
    return BuildResult(record=record, winner=winner, output=out)


def _finish(record: RunRecord, out: Path, started: float, notify: Progress) -> RunRecord:
    from slipstream.build.report import headline, write_report

    record = record.model_copy(update={"duration_s": time.perf_counter() - started})
    record = record.model_copy(update={"headline": headline(record)})
    record.write(out / "run.json")
    notify(BuildEvent(stage="report"))
    write_report(record, out)
    return record


def _search(
    run: _Run,
    recipe: Recipe,
    baseline_bundle: Bundle,
    measurer: Measurer,
    torch_ctx: TorchSourceContext | None,
    calibration: Path,
    notify: Progress,
) -> Bundle:
    """Baseline, candidates, selection with side-by-side confirmation, tuning, torch eager, packaging."""
    out = Path(recipe.output)
    notify(BuildEvent(stage="baseline", candidate=BASELINE))
    base = measurer.measure(baseline_bundle, reference=True)
    if base.metrics is None:
        run.record = run.record.model_copy(
            update={"baseline": run.record.baseline.model_copy(update={"error": base.error, "signal": base.signal})}
        )
        raise EngineError(f"The baseline could not be measured: {base.error}")
    baseline = CandidateResult(
        name=BASELINE, passes=(), status="ok", metrics=base.metrics, bundle=str(baseline_bundle.path),
        lineage=tuple(e.step for e in baseline_bundle.manifest.lineage), graph_optimization=base.graph_optimization,
        warnings=base.notes,
    )  # fmt: skip
    run.record = run.record.model_copy(update={"baseline": baseline})

    if recipe.candidates == "auto":
        label_free = measurer.metric.against != "labels"
        chosen = auto_candidates(recipe, str(calibration), baseline_bundle.model_path)
        chosen = (*chosen, *source_ladder(torch_ctx, recipe, str(calibration), label_free=label_free))
    else:
        chosen = recipe.candidates
    results: list[CandidateResult] = []
    seen = {engine_key(baseline_bundle.model_sha256, baseline_bundle.manifest): BASELINE}
    best: tuple[float, str] | None = None
    for i, cand in enumerate(chosen):
        shown = best[1] if best else None
        notify(BuildEvent("candidate", cand.name, i, len(chosen), shown))

        def say(text: str, name: str = cand.name, i: int = i, shown: str | None = shown) -> None:
            notify(BuildEvent("candidate", f"{name}: {text}", i, len(chosen), shown))

        result = _try_candidate(cand, baseline_bundle, out, measurer, recipe, torch_ctx, calibration, seen, say)
        results.append(result)
        run.record = run.record.model_copy(update={"candidates": tuple(results)})
        if result.metrics is not None:
            gain = base.metrics.latency_p50_ms / result.metrics.latency_p50_ms
            if best is None or gain > best[0]:
                best = (gain, f"{cand.name} (first pass {gain:.2f}×)")

    if recipe.candidates == "auto":
        rescue = _sensitivity_candidate(
            recipe,
            baseline_bundle,
            measurer.dataset,
            measurer.metric,
            base.metrics,
            results,
            calibration,
            lambda i, n, layer: notify(BuildEvent("sensitivity", layer, i, n)),
        )
        if rescue is not None:
            sensitivity, rescued = rescue
            run.record = run.record.model_copy(update={"sensitivity": sensitivity})
            if rescued is not None:
                notify(BuildEvent("candidate", rescued.name, len(chosen), len(chosen) + 1, best[1] if best else None))
                results.append(
                    _try_candidate(rescued, baseline_bundle, out, measurer, recipe, torch_ctx, calibration, seen)
                )
                run.record = run.record.model_copy(update={"candidates": tuple(results)})

    notify(BuildEvent(stage="robustness"))
    summary, robust_base, robust_results = measure_robustness(
        measurer, baseline_bundle, run.record.baseline, results, torch_ctx
    )
    run.record = run.record.model_copy(
        update={"robustness": summary, "baseline": robust_base, "candidates": tuple(robust_results)}
    )
    record = run.record
    selection = select(record, recipe.budget)
    # Timings on a shared machine drift; re-time each would-be winner alternately with the baseline and
    # move on to the next one if the gain does not hold up side by side.
    for _ in range(len(record.candidates)):
        if selection.winner == BASELINE or record.objective == "size":
            break
        notify(BuildEvent(stage="confirm", candidate=selection.winner))
        record = _with_confirmed_gain(record, selection.winner, baseline_bundle, measurer)
        again = select(record, recipe.budget)
        if again.winner == selection.winner:
            selection = again
            break
        selection = again
    if (runner := runner_up(record, selection)) is not None:
        # The confirmations, taken at different times, reversed the first pass: time the two together.
        notify(BuildEvent(stage="head to head", candidate=f"{selection.winner} vs {runner.name}"))
        record = record.model_copy(update={"head_to_head": _head_to_head(record, selection.winner, runner, measurer)})
        decided = select(record, recipe.budget)
        if decided.winner != selection.winner:
            # Its gain over the baseline was the low re-timing that lost it the first place: time it again.
            notify(BuildEvent(stage="confirm", candidate=decided.winner))
            record = _with_confirmed_gain(record, decided.winner, baseline_bundle, measurer, again=True)
            decided = select(record, recipe.budget)
        selection = decided
    run.record = record = record.model_copy(update={"selection": selection})
    winner_result = record.candidate(selection.winner)
    winner_src = Bundle.load(winner_result.bundle) if winner_result.bundle else baseline_bundle
    notify(BuildEvent(stage="tune", candidate=selection.winner))
    tuning = tune(winner_src, recipe, measurer, winner_result.graph_optimization)
    run.record = record = record.model_copy(update={"tuning": tuning})
    if torch_ctx is not None:
        notify(BuildEvent(stage="torch eager", candidate=selection.winner))
        compared = _torch_side_by_side(torch_ctx, winner_src, selection.winner, tuning, measurer, recipe)
        run.record = record = record.model_copy(update={"source_timing": compared})
    return package(winner_src, out / "winner", recipe, winner_result, tuning, measurer.dataset)


def _torch_side_by_side(
    ctx: TorchSourceContext, bundle: Bundle, name: str, tuning: dict[str, Any], measurer: Measurer, recipe: Recipe
) -> SideBySide:
    """torch eager against the winner at the winner's tuned settings, with the ``ALTERNATING`` ones on top
    (onnxruntime not spinning: evaluate/sidebyside.py), cached by content like every timing."""
    chosen = {**tuning["chosen"], **ALTERNATING}
    key = "torch-eager:" + sha256_json([measurer.key(bundle), ctx.data_key, chosen, name])
    if key in measurer.cache:
        return SideBySide.model_validate(measurer.cache[key])
    level = str(chosen.pop("graph_optimization", "all"))
    engine = measurer.engine(bundle, level, **chosen)
    compared = torch_eager_timing(ctx, engine, first_rows(measurer.dataset, recipe.batch_size), recipe, name)
    measurer.remember(key, compared.model_dump(mode="json"))
    return compared


def _sensitivity_candidate(
    recipe: Recipe,
    baseline: Bundle,
    dataset: Dataset,
    metric: Metric,
    base: CandidateMetrics,
    results: list[CandidateResult],
    calibration: Path,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[SensitivityReport, Candidate | None] | None:
    """When every static int8 candidate broke the budget: find the layers to keep in fp32 (one quantization
    and evaluation per layer, each reported to ``progress``), and try that."""
    relative = recipe.budget.kind == "relative"
    drops = [
        quality_drop(base.quality, r.metrics.quality, higher_is_better=metric.higher_is_better, relative=relative)
        for r in results
        if r.name.startswith("int8-static") and r.metrics is not None
    ]
    if not drops or min(drops) <= recipe.budget.max_accuracy_drop:
        return None
    allowed = recipe.budget.max_accuracy_drop * (abs(base.quality) if relative else 1.0)
    options = {"data": str(calibration), "per_channel": True}
    report = analyze_sensitivity(
        baseline,
        dataset,
        metric,
        pass_name="quantize.static",
        options=options,
        data=str(calibration),
        seed=recipe.seed,
        progress=progress,
    )
    exclude = report.most_sensitive(allowed)
    if not exclude:
        return report, None  # no single layer explains the loss; the report still shows every layer's share
    chosen = {**options, "nodes_to_exclude": exclude}
    return report, Candidate(name="int8-static-excl", passes=({"quantize.static": chosen},))


def _try_candidate(
    cand: Candidate,
    baseline: Bundle,
    out: Path,
    measurer: Measurer,
    recipe: Recipe,
    torch_ctx: TorchSourceContext | None,
    calibration: Path,
    seen: dict[str, str],
    say: Callable[[str], None] | None = None,
) -> CandidateResult:
    """Build and measure one candidate in a child process (build/isolate.py): any failure, a crash included, is
    recorded. The recipe's calibration data reaches every pass that takes data (quantize.static calibrates on
    it unless the candidate names its own ``data``). A model byte-identical to an earlier one is measured once
    and recorded as the same model (``seen`` maps model sha256 to the first candidate that made it)."""
    started = time.perf_counter()
    labels = tuple(_pass_label(p) for p in cand.passes)
    if (skip := skip_reason(cand, torch_ctx) or engine_skip(cand)) is not None:
        return CandidateResult(name=cand.name, passes=labels, status="skipped", error=skip)
    try:
        refs = [_pass_ref(p) for p in cand.passes]
        dest = out / "candidates" / cand.name
        if is_torch_chain(cand):
            if torch_ctx is None:
                raise torch_refusal(cand, recipe, baseline)
            bundle, hits = run_torch_candidate(torch_ctx, refs, dest, recipe, str(calibration), say)
            measured = measurer.measure(bundle)
            measured = replace(measured, cache_hits=hits)
        else:
            as_json = tuple(r if isinstance(r, str) else [r[0], r[1]] for r in refs)
            measured = measurer.produce_and_measure(baseline, as_json, dest, data=calibration)  # type: ignore[arg-type]
    except Exception as exc:  # a failed candidate is recorded with its error, never allowed to abort the build
        text = str(exc) if isinstance(exc, SlipstreamError) else f"{type(exc).__name__}: {exc}"
        return CandidateResult(
            name=cand.name, passes=labels, status="failed", error=text, duration_s=time.perf_counter() - started
        )
    if measured.metrics is None or measured.bundle is None:
        return CandidateResult(
            name=cand.name, passes=labels, status="failed", error=measured.error, signal=measured.signal,
            bundle=measured.bundle, cache_hits=measured.cache_hits, duration_s=time.perf_counter() - started,
        )  # fmt: skip
    bundle = Bundle.load(measured.bundle)
    same_as = seen.setdefault(engine_key(bundle.model_sha256, bundle.manifest), cand.name)
    warnings = [
        str(text)
        for entry in bundle.manifest.resolved.values()
        if isinstance(entry, dict) and isinstance(entry.get("warnings"), list)
        for text in entry["warnings"]  # type: ignore[union-attr]
    ]
    return CandidateResult(
        name=cand.name,
        passes=labels,
        status="ok",
        metrics=measured.metrics,
        bundle=str(bundle.path),
        lineage=tuple(e.step for e in bundle.manifest.lineage),
        duration_s=time.perf_counter() - started,
        cache_hits=measured.cache_hits,
        same_as=same_as if same_as != cand.name else None,
        graph_optimization=measured.graph_optimization,
        warnings=(*measured.notes, *warnings),
        training=training_steps(bundle),
    )


def _head_to_head(record: RunRecord, winner: str, runner: CandidateResult, measurer: Measurer) -> SideBySide:
    """The confirmed winner (reference) against the runner-up (subject), timed in alternation."""
    first = record.candidate(winner)
    return measurer.confirm(
        Bundle.load(first.bundle or ""),
        Bundle.load(runner.bundle or ""),
        runner.name,
        levels=(first.graph_optimization, runner.graph_optimization),
        reference=winner,
    )


def _with_confirmed_gain(
    record: RunRecord, name: str, baseline: Bundle, measurer: Measurer, *, again: bool = False
) -> RunRecord:
    """``name`` re-timed alternately with the baseline (``again``: a fresh timing, not the cached one)."""
    cand = record.candidate(name)
    levels = (record.baseline.graph_optimization, cand.graph_optimization)
    compared = measurer.confirm(baseline, Bundle.load(cand.bundle or ""), name, levels=levels, again=again)
    confirmed = cand.model_copy(update={"confirmed_gain": compared.ratio, "confirmation": compared})
    return record.model_copy(
        update={"candidates": tuple(confirmed if c.name == name else c for c in record.candidates)}
    )
