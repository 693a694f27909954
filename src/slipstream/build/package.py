"""The winner's last steps: tune its session settings, then package it with its profile and those settings.

The tuned settings go into the winner's manifest as ``resolved["session"]``; every Engine built on the bundle
(``serve``, ``bench``) uses them unless its caller sets a value itself (runtime/targets.py).
"""

from __future__ import annotations

import shutil
from typing import Any

from slipstream.artifact.bundle import Bundle, Step, write_bundle
from slipstream.artifact.sbom import SBOM_FILE, environment_sbom
from slipstream.build.measure import Measurer, first_rows
from slipstream.build.recipe import Recipe
from slipstream.build.record import CandidateResult
from slipstream.build.streams import StreamsTrial, decide_streams, time_streams
from slipstream.data.datasets import Dataset
from slipstream.evaluate.bench import BenchSettings, bench
from slipstream.runtime.choice import ENGINE_KEY, engine_choice, recorded_choice
from slipstream.runtime.targets import physical_cores


def tune(bundle: Bundle, recipe: Recipe, measurer: Measurer, level: str = "all") -> dict[str, Any]:
    """Try thread counts and execution modes on the winner; keep the fastest at the recipe's batch size.

    ``level`` is the graph-optimization level the winner was measured at (a safer one when onnxruntime
    crashed at 'all'); it is kept, and written with the chosen settings.
    """
    cache_key = "tune:" + measurer.key(bundle) + ":" + level
    if cache_key in measurer.cache:
        cached: dict[str, Any] = measurer.cache[cache_key]
        return cached
    feeds = {recipe.batch_size: first_rows(measurer.dataset, recipe.batch_size)}
    budget = recipe.bench_time_s / 2
    settings = BenchSettings(batch_sizes=(recipe.batch_size,), warmup_runs=3, min_time_s=budget / 4, max_time_s=budget)
    trials: list[dict[str, Any]] = []
    # OpenVINO has no execution mode to choose (its streams are the target's inter_op_threads): threads only.
    on_openvino = engine_choice(bundle.manifest).engine == "openvino"
    modes = ("sequential",) if on_openvino else ("sequential", "parallel")
    for threads in sorted({1, physical_cores()}):
        for mode in modes:
            engine = measurer.engine(bundle, level, intra_op_threads=threads, execution_mode=mode)
            report = bench(lambda engine=engine: engine, settings, feeds=feeds)  # type: ignore[misc]
            trials.append({"intra_op_threads": threads, "execution_mode": mode, "p50_ms": report.results[0].p50_ms})
        if threads > 1 and not on_openvino:
            # onnxruntime's idle threads spin; on a shared CPU that costs the other work its cores (measured:
            # MiniLM int8 at 2 threads beside other load, 1.55x -> 2.85x fp32 without spinning).
            engine = measurer.engine(bundle, level, intra_op_threads=threads, intra_op_spinning=False)
            report = bench(lambda engine=engine: engine, settings, feeds=feeds)  # type: ignore[misc]
            trials.append(
                {
                    "intra_op_threads": threads,
                    "execution_mode": "sequential",
                    "intra_op_spinning": False,
                    "p50_ms": report.results[0].p50_ms,
                }
            )
    best = min(trials, key=lambda t: t["p50_ms"])
    chosen: dict[str, Any] = {
        k: best[k] for k in ("intra_op_threads", "execution_mode", "intra_op_spinning") if k in best
    }
    if level != "all":
        chosen["graph_optimization"] = level
    tuning: dict[str, Any] = {"chosen": chosen, "trials": trials}
    if on_openvino and physical_cores() > 1:
        streams = _tune_streams(bundle, recipe, measurer, level, feeds[recipe.batch_size], best["intra_op_threads"])
        tuning["streams"] = streams.model_dump(mode="json")
        if streams.chosen:
            chosen["inter_op_threads"] = streams.streams
    measurer.remember(cache_key, tuning)
    return tuning


def _tune_streams(
    bundle: Bundle, recipe: Recipe, measurer: Measurer, level: str, feeds: Any, threads: int
) -> StreamsTrial:
    """OpenVINO: one stream per core against one stream, at the tuned thread count (build/streams.py)."""
    streams = physical_cores()
    timing = time_streams(
        lambda n: measurer.engine(bundle, level, intra_op_threads=max(threads, streams), inter_op_threads=n),
        feeds,
        streams,
        min_time_s=recipe.bench_time_s / 2,
        max_time_s=recipe.bench_time_s,
    )
    return decide_streams(timing, streams, objective=recipe.objective, min_speedup=recipe.budget.min_speedup)


def package(
    src: Bundle, dest: Any, recipe: Recipe, result: CandidateResult, tuning: dict[str, Any], dataset: Dataset
) -> Bundle:
    """The winner as its own bundle: measured metrics, tuned session settings, and the reference profile of
    the evaluation data (profile.json), which drift, accuracy and OOD monitoring compare live traffic with. A
    classifier also gets its penultimate activations as a monitoring-only output (monitor.penultimate), which
    the profile samples for the embedding test; clients never see it."""
    from slipstream.monitor.penultimate import with_embedding_output

    task = {"mae": "regression", "rmse": "regression", "cosine": "auto"}.get(recipe.metric, "classification")
    staged = dest.parent / f".{dest.name}.embedding"
    safe = dest.parent / f".{dest.name}.session"
    try:
        if "graph_optimization" in tuning["chosen"]:
            # Profiling runs the model here: it must already carry the level that onnxruntime survives.
            resolved = {**src.manifest.resolved, "session": tuning["chosen"]}
            src = write_bundle(
                safe, src.load_model(), src.manifest.model_copy(update={"resolved": resolved}), overwrite=True
            )
        exposed = with_embedding_output(src.path, staged, overwrite=True) if task == "classification" else None
        return _package_profiled(Bundle.load(exposed) if exposed else src, dest, recipe, result, tuning, dataset, task)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(safe, ignore_errors=True)


def _package_profiled(
    src: Bundle,
    dest: Any,
    recipe: Recipe,
    result: CandidateResult,
    tuning: dict[str, Any],
    dataset: Dataset,
    task: str,
) -> Bundle:
    """:func:`package` once the embedding step ran: profile ``src`` and write it as the winner."""
    from slipstream.monitor.profile import PROFILE_FILE, ProfileConfig, profile_from_dataset

    profile = profile_from_dataset(src.path, dataset, ProfileConfig(task=task))
    m = result.metrics
    metrics = dict(src.manifest.metrics)
    if m is not None:
        metrics["build"] = {
            "metric": recipe.metric,
            "quality": m.quality,
            "latency_p50_ms": m.latency_p50_ms,
            "latency_p99_ms": m.latency_p99_ms,
            "throughput_sps": m.throughput_sps,
            "batch_size": recipe.batch_size,
            "target": recipe.target,
        }
    measured = {"latency_p50_ms": m.latency_p50_ms, "batch_size": float(recipe.batch_size)} if m is not None else {}
    if result.confirmed_gain is not None:
        measured["gain"] = result.confirmed_gain
    # Every consumer (serve, bench, export) opens the winner on this engine at this precision (runtime/open.py).
    choice = recorded_choice(src.manifest, measured).model_dump(mode="json")
    resolved = {
        **src.manifest.resolved,
        "session": tuning["chosen"],
        "build_candidate": result.name,
        ENGINE_KEY: choice,
    }
    manifest = src.manifest.model_copy(update={"metrics": metrics, "resolved": resolved, "name": recipe.name})
    step = Step(
        name="build.select@1",
        config={"candidate": result.name, "recipe": recipe.name},
        input_sha256=src.model_sha256,
    )
    # The environment that built it, as a CycloneDX SBOM: a bundle file like any other, so a signature covers it.
    extra = {PROFILE_FILE: profile.to_json_bytes(), SBOM_FILE: environment_sbom(manifest)}
    return write_bundle(dest, src.load_model(), manifest, step=step, extra_files=extra, overwrite=True)
