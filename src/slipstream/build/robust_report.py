"""The report's robustness section: robust accuracy per candidate and per ε, and speed against robustness."""

from __future__ import annotations

import html
from collections.abc import Mapping

from slipstream.build.plots import Point, pareto_front, scatter_svg
from slipstream.build.record import CandidateResult, RunRecord
from slipstream.evaluate.robust import GRADIENT_ATTACKS, GRADIENT_FREE, CandidateRobustness

_LABELS = {"fgsm": "FGSM", "pgd": "PGD", "uniform": "uniform noise", "gaussian": "gaussian noise", "simba": "SimBA"}


def _robust(record: RunRecord) -> list[tuple[CandidateResult, CandidateRobustness]]:
    return [
        (c, c.robustness)
        for c in (record.baseline, *record.candidates)
        if c.robustness is not None and c.robustness.error is None
    ]


def worst_case(robust: CandidateRobustness, eps_of_range: float) -> float | None:
    """The lowest accuracy over every attack at ``eps_of_range`` (None: nothing measured there)."""
    values = [r.accuracy for r in robust.results if r.eps_of_range == eps_of_range]
    return min(values) if values else None


def _points(record: RunRecord, kinds: Mapping[str, str]) -> list[Point]:
    summary = record.robustness
    if summary is None or not summary.eps_of_range:
        return []
    largest = max(summary.eps_of_range)
    points = []
    for c, robust in _robust(record):
        worst = worst_case(robust, largest)
        if c.metrics is not None and worst is not None:
            points.append(Point(c.name, c.metrics.latency_p50_ms, worst, kinds.get(c.name, "rejected")))
    return points


def robust_pareto(record: RunRecord) -> list[str]:
    """Candidates no other one beats on both p50 latency and worst-case robust accuracy at the largest ε."""
    return [p.name for p in pareto_front(_points(record, {}))]


def robust_headline(record: RunRecord) -> str | None:
    """One line for the CLI and the report: the winner's worst-case robust accuracy beside the baseline's."""
    summary, sel = record.robustness, record.selection
    if summary is None or sel is None:
        return None
    if summary.status != "measured":
        return f"robust accuracy {summary.status}: {summary.reason}"
    largest = max(summary.eps_of_range)
    winner, base = record.candidate(sel.winner).robustness, record.baseline.robustness
    if winner is None or base is None or winner.error is not None or base.error is not None:
        return None
    mine, theirs = worst_case(winner, largest), worst_case(base, largest)
    if mine is None or theirs is None:
        return None
    compared = "" if sel.winner == record.baseline.name else f", baseline {theirs:.3f}"
    return (
        f"robust accuracy at ε {largest:g} of the input range (worst attack): {sel.winner} {mine:.3f}{compared}; "
        f"{summary.examples} rows, {summary.duration_s:.1f} s"
    )


def robustness_html(record: RunRecord, kinds: Mapping[str, str]) -> str:
    """The section: what was measured (or why not), the table, and the Pareto view. ``kinds`` colours points."""
    summary = record.robustness
    if summary is None:
        return ""
    if summary.status != "measured":
        return (
            f'<h2>Robustness</h2><p id="robustness">Not measured: {html.escape(summary.reason or summary.status)}.</p>'
        )
    present = {r.attack for _, robust in _robust(record) for r in robust.results}
    attacks = [a for a in (*GRADIENT_ATTACKS, *GRADIENT_FREE) if a in present]
    columns = [(a, e) for e in summary.eps_of_range for a in attacks]
    header = "<tr><th>candidate</th><th>p50 ms</th><th>clean</th>"
    header += "".join(f"<th>{_LABELS[a]} ε {e:g}</th>" for a, e in columns)
    header += f"<th>worst at ε {max(summary.eps_of_range):g}</th><th>Pareto</th><th>seconds</th></tr>"
    front = set(robust_pareto(record))
    rows = []
    base = record.baseline.robustness
    for c in (record.baseline, *record.candidates):
        robust = c.robustness
        if robust is None:
            continue
        if robust.error is not None:
            rows.append(
                f"<tr class='failed'><td>{html.escape(c.name)}</td>"
                f"<td colspan='{len(columns) + 5}'>not measured: {html.escape(robust.error)}</td></tr>"
            )
            continue
        cells = [html.escape(c.name), f"{c.metrics.latency_p50_ms:.3f}" if c.metrics else "–"]
        cells.append("–" if robust.clean_accuracy is None else f"{robust.clean_accuracy:.3f}")
        for attack, eps in columns:
            value = robust.accuracy(attack, eps)
            before = base.accuracy(attack, eps) if base is not None else None
            delta = f" <small>({value - before:+.3f})</small>" if value is not None and before is not None else ""
            cells.append("–" if value is None else f"{value:.3f}{delta}")
        worst = worst_case(robust, max(summary.eps_of_range))
        cells.append("–" if worst is None else f"{worst:.3f}")
        cells.append("same model as " + html.escape(c.same_as) if c.same_as else ("✓" if c.name in front else ""))
        cells.append(f"{robust.duration_s:.2f}")
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    eps_text = ", ".join(f"{f:g} → {e:.4g}" for f, e in zip(summary.eps_of_range, summary.eps, strict=True))
    lo, hi = summary.input_range or (0.0, 0.0)
    source = "; ".join(f"{_LABELS[r.attack]} ε {r.eps_of_range:g}: {r.accuracy:.3f}" for r in summary.source_accuracy)
    notes = [
        f"{summary.examples} held-out rows, labels from {summary.labels}; inputs clipped to [{lo:.4g}, {hi:.4g}]; "
        f"ε (L∞, fraction of the range → input units): {eps_text}.",
        f"FGSM and PGD ({summary.pgd_steps} steps) are crafted on {html.escape(summary.gradient_source)}; "
        f"the source's own accuracy on them: {source}."
        if summary.gradient_source
        else f"No FGSM/PGD: {html.escape(summary.gradient_note or '')}.",
        f"Noise and SimBA ({summary.simba_steps} pixels tried per row, ±ε) attack each candidate's own session. "
        "In brackets: the change against the baseline.",
        f"Cost: {summary.duration_s:.2f} s in all, {summary.craft_s:.2f} s of it crafting on the source.",
    ]
    points = _points(record, kinds)
    largest = max(summary.eps_of_range)
    plot = scatter_svg(
        points,
        title=f"worst-case robust accuracy (ε {largest:g}) vs latency",
        x_label="p50 latency (ms)",
        y_label="robust accuracy",
    )
    return (
        "<h2>Robustness</h2>"
        + "".join(f"<p>{n}</p>" for n in notes)
        + f'<table id="robustness">{header}{"".join(rows)}</table>'
        + f'<div class="plots">{plot}</div>'
    )
