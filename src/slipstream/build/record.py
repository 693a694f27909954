"""The run record (run.json): every candidate a build tried, with its metrics or its error."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from slipstream.evaluate.robust import CandidateRobustness, RobustnessSummary
from slipstream.evaluate.sidebyside import SideBySide


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class CandidateMetrics(_Frozen):
    quality: float = Field(description="The recipe's metric on the evaluation data.")
    latency_p50_ms: float = Field(description="Median latency at the recipe's batch size (first pass, alone).")
    latency_p90_ms: float | None = Field(default=None, description="90th percentile latency (the spread).")
    latency_p99_ms: float
    timed_runs: int = Field(default=0, description="How many timed calls the percentiles are over.")
    throughput_sps: float = Field(description="Samples per second at the median latency.")
    size_bytes: int = Field(description="Bundle size on disk.")


class TrainingStep(_Frozen):
    """A torch step before export (pruning, fine-tuning, distillation), as the candidate's bundle records it."""

    step: str = Field(description="The step's stable name, e.g. 'train.distill@1'.")
    summary: str = Field(description="What it did, in words: units removed; steps, loss and time of training.")
    metrics: dict[str, JsonValue] = Field(default_factory=dict, description="What the step measured.")


class CandidateResult(_Frozen):
    name: str
    passes: tuple[str, ...] = Field(description="The pass chain as written in the recipe.")
    status: Literal["ok", "failed", "skipped"]
    error: str | None = Field(
        default=None, description="The full error text when the candidate failed; the reason when it was skipped."
    )
    metrics: CandidateMetrics | None = None
    bundle: str | None = Field(default=None, description="Where the candidate's bundle was written.")
    lineage: tuple[str, ...] = Field(default=(), description="Step names from the source to this candidate.")
    duration_s: float = Field(default=0.0, description="Wall time to produce and measure it.")
    cache_hits: int = Field(default=0, description="Passes answered by the pass cache.")
    confirmed_gain: float | None = Field(
        default=None,
        description="Latency gain over the baseline when both were re-timed alternately in one run (noise check).",
    )
    confirmation: SideBySide | None = Field(
        default=None, description="The side-by-side re-timing behind confirmed_gain, with both spreads."
    )
    same_as: str | None = Field(
        default=None, description="An earlier candidate whose model is byte-identical: measured once, shared."
    )
    signal: str | None = Field(default=None, description="The signal that killed the candidate's child process.")
    graph_optimization: str = Field(
        default="all", description="The onnxruntime graph-optimization level it was measured at (resolved)."
    )
    warnings: tuple[str, ...] = ()
    robustness: CandidateRobustness | None = Field(
        default=None, description="Clean and robust accuracy on the attack rows (see RunRecord.robustness)."
    )
    training: tuple[TrainingStep, ...] = Field(
        default=(), description="The torch steps that made it (what was slimmed, how it was trained), if any."
    )


class LayerSensitivity(_Frozen):
    node: str
    op_type: str
    quality: float = Field(description="The metric with only this layer changed.")
    drop: float = Field(description="Baseline quality minus this (positive = worse), in metric units.")


class SensitivityReport(_Frozen):
    pass_name: str
    options: dict[str, Any]
    metric: str
    baseline_quality: float
    all_layers_quality: float = Field(description="The metric with the pass applied to every layer.")
    layers: tuple[LayerSensitivity, ...] = Field(description="Most sensitive first.")
    skipped_unnamed: int = Field(description="Layers without a node name, which cannot be excluded by name.")
    duration_s: float

    def most_sensitive(self, budget: float) -> list[str]:
        """The fewest layers to exclude so that the sum of the remaining drops fits ``budget``."""
        remaining = sum(max(layer.drop, 0.0) for layer in self.layers)
        chosen: list[str] = []
        for layer in self.layers:
            if remaining <= budget or layer.drop <= 0:
                break
            chosen.append(layer.node)
            remaining -= layer.drop
        return chosen


class Rejection(_Frozen):
    name: str
    reason: str


class Selection(_Frozen):
    winner: str = Field(description="The chosen candidate's name ('baseline' when nothing beat it).")
    reason: str
    rejections: tuple[Rejection, ...]
    runners: tuple[str, ...] = Field(default=(), description="The other candidates within budget, best first.")


class RunRecord(_Frozen):
    name: str
    recipe: dict[str, JsonValue]
    recipe_sha256: str
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    duration_s: float = 0.0
    machine: dict[str, JsonValue] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    metric: str
    higher_is_better: bool
    objective: Literal["latency", "throughput", "size"]
    batch_size: int
    baseline: CandidateResult
    candidates: tuple[CandidateResult, ...]
    selection: Selection | None = None
    tuning: dict[str, JsonValue] = Field(default_factory=dict, description="Session settings tried on the winner.")
    sensitivity: SensitivityReport | None = Field(
        default=None, description="Per-layer sensitivity, when the build computed it (see build/sensitivity.py)."
    )
    head_to_head: SideBySide | None = Field(
        default=None,
        description="The winner (reference) against the runner-up whose first pass was faster (subject), timed "
        "side by side: their two confirmations against the baseline were taken at different times and reversed "
        "the first pass, so the pair is timed together and that decides between them (build/select.py).",
    )
    source_timing: SideBySide | None = Field(
        default=None,
        description="The source framework (torch eager) against the winner: interleaved, at the winner's threads.",
    )
    robustness: RobustnessSummary | None = Field(
        default=None, description="The robustness stage: rows, ε, attacks, cost, or why it did not apply."
    )
    headline: tuple[str, ...] = Field(
        default=(), description="The summary lines the CLI and the report print; every ratio in them is side by side."
    )
    error: str | None = Field(default=None, description="Why the build stopped early, when it did.")

    def candidate(self, name: str) -> CandidateResult:
        if name == self.baseline.name:
            return self.baseline
        return next(c for c in self.candidates if c.name == name)

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
