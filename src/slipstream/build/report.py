"""report.html and report.json: the candidate table, Pareto plots, robustness, the winner's lineage, the machine.

The HTML is one self-contained file (inline CSS and SVG, no scripts, no CDN) so it opens offline.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from slipstream.build.plots import Point, pareto_front, scatter_svg
from slipstream.build.record import CandidateResult, RunRecord
from slipstream.build.robust_report import robust_headline, robust_pareto, robustness_html
from slipstream.build.select import objective_gain, quality_drop


def _decisions(record: RunRecord) -> dict[str, str]:
    sel = record.selection
    out = {record.baseline.name: "baseline"}
    if sel is None:
        return out
    out.update({r.name: r.reason for r in sel.rejections})
    out[sel.winner] = "winner: " + sel.reason
    return out


def _kind(name: str, record: RunRecord) -> str:
    sel = record.selection
    if name == record.baseline.name:
        return "winner" if sel is not None and sel.winner == name else "baseline"
    if sel is not None and sel.winner == name:
        return "winner"
    return "rejected"


def _measured(record: RunRecord) -> list[CandidateResult]:
    return [c for c in (record.baseline, *record.candidates) if c.metrics is not None]


def _row(record: RunRecord, c: CandidateResult, decision: str) -> str:
    base = record.baseline.metrics
    cells = [html.escape(c.name), html.escape(" → ".join(c.passes) or "(source)"), c.status]
    if c.metrics is not None and base is not None:
        m = c.metrics
        drop = quality_drop(base.quality, m.quality, higher_is_better=record.higher_is_better, relative=False)
        cells += [
            f"{m.quality:.4f}",
            f"{drop:+.4f}",
            f"{m.latency_p50_ms:.3f}",
            f"{m.latency_p99_ms:.3f}",
            f"{m.throughput_sps:,.0f}",
            f"{objective_gain(base, m, record.objective):.2f}×",
            html.escape(c.confirmation.ratio_text()) if c.confirmation else ("same model" if c.same_as else "–"),
            f"{m.size_bytes / 1024:,.1f}",
        ]
    else:
        cells += ["–"] * 8
    cls = "winner" if decision.startswith("winner") else ("failed" if c.status == "failed" else "")
    reason = c.error or "" if c.status == "skipped" else f"failed: {c.error or ''}"  # a skip reason says "skipped"
    detail = html.escape(decision if c.status == "ok" else reason)
    if c.status == "ok" and c.warnings:
        detail += "<br>" + "<br>".join(html.escape(w) for w in c.warnings)
    if c.training:  # what was slimmed and how it was trained, so a slim candidate's quality can be read
        detail += "<br>" + "<br>".join(html.escape(t.summary) for t in c.training)
    cells.append(detail)
    return f'<tr class="{cls}">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#111;max-width:1200px}
table{border-collapse:collapse;margin:12px 0;font-size:13px}th,td{border:1px solid #d1d5db;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f4f6}tr.winner td{background:#ecfdf5;font-weight:600}
tr.failed td{background:#fef2f2}.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{border:1px solid #e5e7eb}
code{background:#f3f4f6;padding:1px 4px}
"""


def headline(record: RunRecord) -> tuple[str, ...]:
    """The summary lines the CLI prints and the report shows: every ratio in them was timed side by side
    (the winner against the baseline, and torch eager against the winner), or is printed as 'unstable (...)'."""
    lines: list[str] = []
    sel = record.selection
    if sel is not None:
        lines.append(f"winner: {sel.winner} — {sel.reason}")
        winner = record.candidate(sel.winner)
        if winner.confirmation is not None:
            lines.append(winner.confirmation.text())
        if record.head_to_head is not None:
            lines.append(record.head_to_head.text())
    if record.source_timing is not None:
        lines.append(record.source_timing.text())
    if (robust := robust_headline(record)) is not None:
        lines.append(robust)
    for c in (record.baseline, *record.candidates):
        if c.signal is not None:
            lines.append(f"{c.name} crashed its child process ({c.signal}); the build went on (see run.json)")
        lines += [f"{c.name}: {w}" for w in c.warnings if w.startswith("onnxruntime crashed")]
    if record.error is not None:
        lines.append(f"the build stopped early: {record.error.splitlines()[0] if record.error else ''}")
    return tuple(lines)


def headline_mismatches(record: RunRecord) -> list[str]:
    """Every 'N.NN×' in the headline that is not a side-by-side ratio recorded in the run (empty: all match)."""
    measured = {f"{c.confirmation.ratio:.2f}×" for c in record.candidates if c.confirmation is not None}
    for timing in (record.source_timing, record.head_to_head):
        if timing is not None:
            measured.add(f"{timing.ratio:.2f}×")
            if timing.ratio < 1:  # a head-to-head is said as the faster one's ratio
                measured.add(f"{1 / timing.ratio:.2f}×")
    return [
        f"{shown} in {line!r}"
        for line in record.headline
        for shown in re.findall(r"\d+(?:\.\d+)?×", line)
        if shown not in measured
    ]


def _headline_html(record: RunRecord) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in record.headline)
    return f'<ul id="headline">{items}</ul>' if items else ""


def _sensitivity_html(record: RunRecord) -> str:
    sens = record.sensitivity
    if sens is None:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r.node)}</td><td>{html.escape(r.op_type)}</td><td>{r.quality:.4f}</td>"
        f"<td>{r.drop:+.4f}</td></tr>"
        for r in sens.layers
    )
    return (
        f"<h2>Per-layer sensitivity ({html.escape(sens.pass_name)}, one layer at a time)</h2>"
        f'<table id="sensitivity"><tr><th>node</th><th>op</th><th>{html.escape(record.metric)}</th><th>drop</th></tr>'
        f"{rows}</table>"
    )


def render_html(record: RunRecord) -> str:
    decisions = _decisions(record)
    measured = _measured(record)
    lat = [
        Point(c.name, c.metrics.latency_p50_ms, c.metrics.quality, _kind(c.name, record)) for c in measured if c.metrics
    ]
    size = [
        Point(c.name, c.metrics.size_bytes / 1024, c.metrics.quality, _kind(c.name, record))
        for c in measured
        if c.metrics
    ]
    sel = record.selection
    winner = record.candidate(sel.winner) if sel else record.baseline
    header = (
        "<tr><th>candidate</th><th>passes</th><th>status</th><th>"
        + html.escape(record.metric)
        + "</th><th>drop</th><th>p50 ms</th><th>p99 ms</th><th>samples/s</th><th>first-pass gain</th>"
        "<th>side by side</th><th>KiB</th>"
        "<th>decision</th></tr>"
    )
    rows = "".join(_row(record, c, decisions.get(c.name, "")) for c in (record.baseline, *record.candidates))
    lineage = "".join(f"<li><code>{html.escape(step)}</code></li>" for step in winner.lineage)
    tuning = html.escape(json.dumps(record.tuning.get("chosen", {})))
    machine = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in {**record.machine, **record.versions}.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slipstream build: {html.escape(record.name)}</title>
<style>{_CSS}</style></head><body>
<h1>Build report: {html.escape(record.name)}</h1>
<p>Objective <b>{record.objective}</b> at batch {record.batch_size}; metric <b>{html.escape(record.metric)}</b>;
budget <code>{html.escape(json.dumps(record.recipe.get("budget")))}</code>; {len(record.candidates)} candidates in
{record.duration_s:.1f} s.</p>
<h2>Winner: {html.escape(winner.name)}</h2>
<p>{html.escape(sel.reason if sel else "")}. Session settings: <code>{tuning}</code>.</p>
{_headline_html(record)}
<h2>Candidates</h2>
<table id="candidates">{header}{rows}</table>
<h2>Pareto plots</h2>
<div class="plots">
{scatter_svg(lat, title=f"{record.metric} vs latency", x_label="p50 latency (ms)", y_label=record.metric)}
{scatter_svg(size, title=f"{record.metric} vs size", x_label="bundle size (KiB)", y_label=record.metric)}
</div>
{robustness_html(record, {c.name: _kind(c.name, record) for c in measured})}
<h2>Winner's lineage</h2><ol>{lineage}</ol>
{_sensitivity_html(record)}
<h2>Machine and versions</h2><table>{machine}</table>
</body></html>
"""


def write_report(record: RunRecord, out: Path) -> tuple[Path, Path]:
    """Write report.html and report.json into ``out``; returns their paths."""
    html_path, json_path = out / "report.html", out / "report.json"
    front = pareto_front(
        [Point(c.name, c.metrics.latency_p50_ms, c.metrics.quality, "") for c in _measured(record) if c.metrics]
    )
    payload = {
        **record.model_dump(mode="json"),
        "pareto_latency": [p.name for p in front],
        "pareto_latency_robust": robust_pareto(record),
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    html_path.write_text(render_html(record), encoding="utf-8")
    return html_path, json_path
