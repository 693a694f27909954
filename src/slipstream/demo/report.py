"""How the demo prints what it sent and the monitor's view after each phase: drift, accuracy (realized and
estimated), bias, and every alert firing with its reason (and its interval, for the fairness rules)."""

from __future__ import annotations

from collections.abc import Callable

from rich.markup import escape
from rich.table import Table

from slipstream.cli.output import console
from slipstream.demo.result import FiringAlert, MonitorView, PhaseResult, TrafficResult

VIEW_TITLES = {
    "normal": "after normal traffic",
    "drifted": "after drifted traffic",
    "biased": "after biased traffic",
    "attacks": "after the attacks",
}


def phase_table(phases: list[PhaseResult]) -> Table:
    table = Table(title="traffic")
    for col in ("kind", "requests", "answers", "accuracy"):
        table.add_column(col, justify="right" if col in ("requests", "accuracy") else "left")
    for p in phases:
        answers = ", ".join(f"{code}×{n}" for code, n in sorted(p.statuses.items()))
        acc = "-" if p.accuracy is None else f"{p.accuracy:.3f}"
        table.add_row(escape(p.name), str(p.requests), answers, acc)
    return table


def drift_label(v: MonitorView) -> str:
    if not v.drift_judged:
        return "not judged yet"
    return f"{len(v.drifted_features)} of {v.input_features} {v.feature_noun} drifted"


def _quality(v: MonitorView) -> str:
    est = "-" if v.estimated_accuracy is None else f"{v.estimated_accuracy:.3f}"
    real = "no labels" if v.realized_accuracy is None else f"{v.realized_accuracy:.3f}"
    return f"{est} / {real}"


def _ratio(v: MonitorView) -> str:
    fairness = v.snapshot.get("fairness") or {}
    gap = next((g for g in fairness.get("gaps") or [] if g.get("metric") == "demographic_parity_ratio"), None)
    if gap is None or gap.get("value") is None:
        value = fairness.get("demographic_parity_ratio")
        return "-" if value is None else f"{value:.2f}"
    low, high = gap.get("low"), gap.get("high")
    interval = f" [{low:.2f}, {'∞' if high is None else f'{high:.2f}'}]" if low is not None else ""
    return f"{gap['value']:.2f}{interval}\n{gap.get('status', '?')}"


def monitor_table(views: list[MonitorView]) -> Table:
    table = Table(title="the monitor after each phase")
    columns: list[tuple[str, Callable[[MonitorView], str]]] = [
        ("after", lambda v: v.after),
        ("input drift", drift_label),
        ("accuracy\nestimated / realized", _quality),
        ("parity ratio\n[interval]", _ratio),
        ("alerts firing", lambda v: "\n".join(a.rule for a in v.firing) or "none"),
    ]
    for label, _ in columns:
        table.add_column(label, overflow="fold")
    for v in views:
        table.add_row(*(escape(cell(v)) for _, cell in columns))
    return table


def _alert_line(alert: FiringAlert) -> str:
    interval = ""
    if alert.low is not None and alert.high is not None and f"{alert.low:.4g}" not in alert.reason:
        interval = f" (interval {alert.low:.4g} to {alert.high:.4g})"
    return f"  [red]{escape(alert.rule)}[/]: {escape(alert.reason)}{escape(interval)}"


def render_monitoring(traffic: TrafficResult) -> None:
    """The monitor table, then every alert firing after each phase, and why."""
    console.print(monitor_table(traffic.views))
    console.print("alerts firing after each phase, and why:")
    for v in traffic.views:
        note = _attacks_note(traffic) if v.after == "attacks" else ""
        console.print(f" {VIEW_TITLES[v.after]}{note}:" + ("" if v.firing else " none"), highlight=False)
        for alert in v.firing:
            console.print(_alert_line(alert), highlight=False)
    console.print(f"prediction log: {escape(str(traffic.store))}", highlight=False)


def _attacks_note(traffic: TrafficResult) -> str:
    """What the windows hold after the attacks: the burst's copies of one digit and the rest of the last phase."""
    burst = next((p for p in traffic.phases if p.kind == "burst"), None)
    copies = 0 if burst is None else burst.statuses.get(200, 0)
    rest = max(traffic.rows_per_phase - copies, 0)
    last = next((p.kind for p in reversed(traffic.phases) if p.rows), "last")
    return f" (the windows hold the burst's {copies} copies of one digit and the {last} phase's last {rest} rows)"
