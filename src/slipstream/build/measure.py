"""Quality and speed of candidate bundles on one dataset and target, measured in a child process, cached.

Every session is built and timed in a child process (build/isolate.py), so a crash is a recorded failure.
A measurement is keyed by the model's sha256, the data's digest, the metric, the batch size, the target
and the seed, so a second build of the same recipe re-uses it instead of timing again. Side-by-side
re-timings (:meth:`Measurer.confirm`) run here, in the build's process, and only on bundles that already
loaded and ran in a child at the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import JsonValue

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.hashing import sha256_json
from slipstream.build.isolate import SAFER_LEVELS, ChildOutcome, ChildTask, MeasureSpec, run_child, write_eval_data
from slipstream.build.recipe import Recipe
from slipstream.build.record import CandidateMetrics
from slipstream.data.datasets import Dataset, arrays_digest
from slipstream.evaluate.metrics import Metric
from slipstream.evaluate.sidebyside import ALTERNATING, SideBySide, interleave, side_by_side
from slipstream.runtime.base import EngineBase
from slipstream.runtime.choice import engine_key
from slipstream.runtime.open import open_engine
from slipstream.runtime.targets import Target

# Bumped when what a measurement holds changes, so older cache entries are not misread.
MEASURE_VERSION = 2


@dataclass(frozen=True)
class Measured:
    """A candidate's bundle and measurement, or why it has none."""

    bundle: str | None
    metrics: CandidateMetrics | None
    cached: bool = False
    cache_hits: int = 0
    graph_optimization: str = "all"
    notes: tuple[str, ...] = ()
    error: str | None = None
    signal: str | None = None


class Measurer:
    """Quality and speed of bundles on one dataset and target, cached by content."""

    def __init__(
        self, recipe: Recipe, dataset: Dataset, metric: Metric, tgt: Target, cache_file: Path, workdir: Path
    ) -> None:
        self.recipe, self.dataset, self.metric, self.target = recipe, dataset, metric, tgt
        self.cache_file = cache_file
        self.cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        self.data_key = arrays_digest(dataset.inputs)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_file = write_eval_data(dict(dataset.inputs), dataset.labels, workdir / "eval.npz")
        self.reference_file = cache_file.with_name(f".reference-{self.data_key[:16]}.npy")

    @property
    def key_salt(self) -> tuple[JsonValue, ...]:
        r = self.recipe
        return (self.data_key, r.metric, r.batch_size, r.target, r.seed, MEASURE_VERSION)

    def key(self, bundle: Bundle) -> str:
        return sha256_json([engine_key(bundle.model_sha256, bundle.manifest), *self.key_salt])

    def _spec(self, level: str, *, reference: bool) -> MeasureSpec:
        settings = self.target.model_copy(update={"graph_optimization": level})
        return MeasureSpec(
            data=str(self.data_file),
            reference=str(self.reference_file),
            write_reference=reference,
            metric=self.recipe.metric,
            batch_size=self.recipe.batch_size,
            bench_time_s=self.recipe.bench_time_s,
            target=settings.model_dump(mode="json"),
            key_salt=self.key_salt,
            # Measured before: the child only produces it. The baseline is measured again when its outputs
            # (the fidelity reference) are gone.
            skip_keys=()
            if reference and not self.reference_file.is_file()
            else tuple(k for k in self.cache if not k.startswith(("confirm:", "tune:", "torch-eager:", "robust:"))),
        )

    def measure(self, bundle: Bundle, *, reference: bool = False) -> Measured:
        """Measure a bundle as it is (the baseline, or a candidate made in this process)."""
        return self.produce_and_measure(bundle, (), None, reference=reference)

    def produce_and_measure(
        self,
        source: Bundle,
        passes: tuple[JsonValue, ...],
        dest: Path | None,
        *,
        data: Path | None = None,
        reference: bool = False,
    ) -> Measured:
        """Run ``passes`` on ``source`` into ``dest`` and measure the result, all in a child process.

        A crash while building the session is retried at the next safer graph-optimization level; the level
        that worked is returned (and cached) as the candidate's resolved choice.
        """
        levels = SAFER_LEVELS[SAFER_LEVELS.index(self.target.graph_optimization) :]
        task = ChildTask(
            bundle=str(source.path),
            passes=passes,
            dest=str(dest) if dest else None,
            seed=self.recipe.seed,
            data=str(data) if data else None,
        )
        notes: list[str] = []
        hits = 0
        for level in levels:
            outcome = run_child(
                task.model_copy(update={"measure": self._spec(level, reference=reference)}), self.workdir
            )
            hits = max(hits, outcome.cache_hits)
            made = outcome.bundle or (task.bundle if not task.passes else None)
            if outcome.signal is not None and outcome.stage == "session" and made is not None:
                notes.append(
                    f"onnxruntime crashed ({outcome.signal}) building the session at graph optimization "
                    f"'{level}'; measured at a safer level"
                )
                task = ChildTask(bundle=made, seed=self.recipe.seed)  # the passes are done: only measure again
                continue
            return self._result(outcome, made, level, hits, notes)
        return Measured(bundle=None, metrics=None, error="; ".join(notes) + ": crashed at every level", signal="crash")

    def _result(self, outcome: ChildOutcome, made: str | None, level: str, hits: int, notes: list[str]) -> Measured:
        if outcome.error is not None or made is None:
            return Measured(
                bundle=made, metrics=None, cache_hits=hits, error=outcome.error or "no bundle", signal=outcome.signal
            )
        bundle = Bundle.load(made)
        key = self.key(bundle)
        if outcome.metrics is None:  # the child skipped it: measured before
            cached = self.cache.get(key)
            if cached is None:
                return Measured(bundle=made, metrics=None, cache_hits=hits, error="the child did not measure it")
            return Measured(
                bundle=made,
                metrics=CandidateMetrics.model_validate(cached["metrics"]),
                cached=True,
                cache_hits=hits,
                graph_optimization=str(cached["graph_optimization"]),
                notes=tuple(cached["notes"]),
            )
        metrics = CandidateMetrics.model_validate(outcome.metrics)
        self.remember(key, {"metrics": metrics.model_dump(), "graph_optimization": level, "notes": notes})
        return Measured(bundle=made, metrics=metrics, cache_hits=hits, graph_optimization=level, notes=tuple(notes))

    def cached(self, bundle: Bundle) -> Measured | None:
        """The measurement of a bundle made earlier (same bytes, same data and settings), if any."""
        entry = self.cache.get(self.key(bundle))
        if entry is None or not self.reference_file.is_file():
            return None
        return Measured(
            bundle=str(bundle.path),
            metrics=CandidateMetrics.model_validate(entry["metrics"]),
            cached=True,
            graph_optimization=str(entry["graph_optimization"]),
            notes=tuple(entry["notes"]),
        )

    def engine(self, bundle: Bundle, level: str = "all", **settings: Any) -> EngineBase:
        """The bundle's engine (its recorded choice) at the target's settings and a graph-optimization level
        that loaded in a child."""
        return open_engine(bundle, self.target.model_copy(update={"graph_optimization": level, **settings}))

    def confirm(
        self,
        baseline: Bundle,
        candidate: Bundle,
        name: str,
        *,
        levels: tuple[str, str] = ("all", "all"),
        reference: str = "baseline",
        again: bool = False,
    ) -> SideBySide:
        """The candidate against ``baseline`` (named ``reference``: the baseline, or the winner in a
        head-to-head), timed call by call in alternation (see evaluate/sidebyside.py); ``again``: a second
        timing of the same pair, cached apart from the first. Both engines run with the ``ALTERNATING``
        settings (onnxruntime not spinning; see evaluate/sidebyside.py); serving settings, spinning included,
        are tuned on the winner afterwards."""
        salt: list[Any] = [name, levels, "no-spin"] + ([] if reference == "baseline" else [reference])
        if again:
            salt.append("again")
        key = "confirm:" + sha256_json([self.key(baseline), self.key(candidate), *salt])
        if key in self.cache:
            return SideBySide.model_validate(self.cache[key])
        n = self.recipe.batch_size
        feeds = first_rows(self.dataset, n)
        engines = [
            self.engine(baseline, levels[0], **ALTERNATING),
            self.engine(candidate, levels[1], **ALTERNATING),
        ]
        checked = [e.check_inputs(feeds) for e in engines]
        budget = self.recipe.bench_time_s
        base_ms, cand_ms = interleave(
            lambda: engines[0].run(checked[0], check=False),
            lambda: engines[1].run(checked[1], check=False),
            min_time_s=budget / 2,
            max_time_s=budget,
        )
        result = side_by_side(reference, name, base_ms, cand_ms, threads=self.target.resolved_intra_op_threads())
        self.remember(key, result.model_dump(mode="json"))
        return result

    def remember(self, key: str, value: Any) -> None:
        self.cache[key] = value
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        tmp.write_text(json.dumps(self.cache))
        tmp.replace(self.cache_file)


def first_rows(dataset: Dataset, n: int) -> dict[str, np.ndarray]:
    """``n`` rows of real data for timing, repeating the dataset if it is shorter."""
    out = {}
    for k, v in dataset.inputs.items():
        reps = -(-n // len(v))
        out[k] = np.concatenate([v] * reps)[:n] if reps > 1 else v[:n]
    return out
