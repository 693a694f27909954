"""What `slipstream demo` did and what the monitor concluded, as typed values.

The demo prints for people; tests and notebooks read these instead of parsing a rich table. A monitor
view keeps the server's whole snapshot (the JSON of ``GET .../monitoring?evaluate=true``, parsed) beside the
few numbers the demo shows, so nothing the server said is lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slipstream.frozen import Frozen

PhaseKind = Literal["normal", "drifted", "biased", "malformed", "unauthenticated", "burst"]
ViewName = Literal["normal", "drifted", "biased", "attacks"]


class PhaseResult(Frozen):
    """One kind of traffic and what the server answered."""

    kind: PhaseKind = Field(description="Which traffic this was.")
    name: str = Field(description="The row label in the printed traffic table.")
    requests: int = Field(description="Requests sent.")
    statuses: dict[int, int] = Field(description="HTTP status code -> how many answers had it.")
    rows: int = Field(default=0, description="Rows (digits) answered with 200 and scored against their labels.")
    accuracy: float | None = Field(default=None, description="Share of scored rows predicted right; None: none.")
    perturbed_rows: int = Field(default=0, description="Rows changed on purpose (the biased phase's mirrored digits).")
    labels_sent: int = Field(default=0, description="Ground-truth labels sent back for this phase's rows.")


class FiringAlert(Frozen):
    """One alert rule firing, with the numbers it decided on."""

    rule: str = Field(description="The alert rule's name, e.g. 'demographic_parity_ratio'.")
    metric: str = Field(description="The monitor metric it watches.")
    value: float | None = Field(description="The metric's value.")
    low: float | None = Field(description="Interval rules: the lower confidence bound; None otherwise.")
    high: float | None = Field(description="Interval rules: the upper confidence bound; None otherwise.")
    reason: str = Field(description="The monitor's reason, in words.")


class MonitorView(Frozen):
    """The monitor's evaluation right after one phase (its windows then hold that phase's rows)."""

    after: ViewName = Field(description="The phase this view follows ('attacks': malformed, unauthenticated, burst).")
    requests: int = Field(description="Requests the monitor had observed in total.")
    drift_judged: bool = Field(description="Whether the drift window had enough rows to be judged.")
    drift_method: str | None = Field(description="What decided input drift on this window.")
    drifted_features: list[str] = Field(description="The input features found drifted.")
    input_features: int = Field(description="Input features the profile describes (2 per image channel).")
    feature_noun: str = Field(description="What those features are, in words ('image statistics', 'features').")
    realized_accuracy: float | None = Field(description="Accuracy on the labeled rows of the quality window.")
    estimated_accuracy: float | None = Field(description="The label-free (CBPE) estimate on the same window.")
    fairness_reasons: list[str] = Field(description="Every fairness gap beyond its threshold or undecided, in words.")
    firing: list[FiringAlert] = Field(description="Alert rules firing after this phase.")
    snapshot: dict[str, Any] = Field(description="The server's whole monitoring summary, as parsed JSON.")

    @property
    def rules(self) -> set[str]:
        """Names of the alert rules firing."""
        return {a.rule for a in self.firing}


class TrafficResult(Frozen):
    """The serving part of the demo: the traffic sent and the monitor after each phase."""

    seed: int = Field(description="The seed every random choice of the traffic came from.")
    rows_per_phase: int = Field(description="Rows (digits) in each labelled phase; also the monitor's windows.")
    positive_label: int = Field(description="The class of interest of the fairness report (the 'selected' digit).")
    phases: list[PhaseResult] = Field(description="Every phase, in the order sent.")
    views: list[MonitorView] = Field(description="The monitor after each phase that was evaluated, in order.")
    labels_sent: int = Field(description="Ground-truth labels sent back in all.")
    server_errors: int = Field(description="Answers with a 5xx status, over every phase.")
    store: dict[str, int] = Field(description="The prediction log's counters at the end (written, dropped...).")
    metrics_lines: list[str] = Field(description="The request and rejection counters from /metrics at the end.")

    def phase(self, kind: PhaseKind) -> PhaseResult:
        return next(p for p in self.phases if p.kind == kind)

    def view(self, after: ViewName) -> MonitorView:
        return next(v for v in self.views if v.after == after)


class DemoResult(Frozen):
    """Everything `slipstream demo` did, end to end."""

    workdir: Path = Field(description="Where the demo wrote its files.")
    fast: bool = Field(description="Whether the trimmed build (the test suite's mode) ran.")
    heldout_accuracy: float = Field(description="The torch model's accuracy on the held-out digits.")
    tamper_refused: bool = Field(description="A copy of the bundle with one flipped byte failed to load.")
    winner: Path = Field(description="The build's winner bundle, the model that was served.")
    winner_name: str = Field(description="The winning candidate.")
    traffic: TrafficResult = Field(description="What was sent and what the monitor made of it.")
    seconds: float = Field(description="Wall time of the whole demo.")
